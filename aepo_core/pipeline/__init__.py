"""The pipeline over files: the run directory (rundir), the six stages (stages), where data and the
starting policy come from (sources), the start checks (preflight), evaluation, MLflow (tracking),
comparison (compare), sweep plans (sweeps) and process hygiene (processes). No Prefect inside:
flows/ and tasks/ wrap it."""
