"""Analysis jobs: the durable queue in the database (``queue``, the only writer of job
rows), the worker pool that claims and runs them (``pool``) and the code that runs one
claimed job from case rows to the insights transaction (``runner``)."""
