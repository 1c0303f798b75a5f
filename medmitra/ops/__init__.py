"""What a hospital's IT checks before install: backup and restore, the audit trail, metrics
and logs, FHIR export. One module per concern, each the only owner of its data."""
