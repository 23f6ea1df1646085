"""The Prefect flows users run and deploy."""
