"""Published JSON Schemas (the report's contract), installed with the package."""
