"""An app module that fails at import, for error-path tests."""

raise RuntimeError("database URL is not configured")
