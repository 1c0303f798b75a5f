"""HTTP layer: Sanic blueprints (parse -> call a service -> render), the OpenAPI document
and the offline API docs pages."""
