"""`her2exp-server` / `make mlflow-server`: a team's MLflow server on PostgreSQL (her2exp/apps/server.py).

    her2exp-server out=.mlflow-server port=5000          # private PostgreSQL + mlflow server
    her2exp-server backend_store_uri=postgresql+psycopg2://user@db:5432/mlflow \\
        artifacts_destination=s3://bucket/mlflow host=0.0.0.0 port=5000 [processes=4]

Runs then use `tracking=server tracking.uri=http://HOST:PORT`.
"""

from __future__ import annotations

from omegaconf import DictConfig

from her2exp.cli.common import UserError, hydra_command
from her2exp.config import commands as schemas


@hydra_command("server")
def main(cfg: DictConfig) -> None:
    """Serve until SIGTERM/SIGINT; the exit status is the server's."""
    from her2exp.apps.server import PostgresUnavailable, serve

    schemas.check_server(cfg)
    try:
        code = serve(
            cfg.out,
            cfg.backend_store_uri,
            cfg.artifacts_destination,
            cfg.host,
            cfg.port,
            cfg.pg_port,
            cfg.processes,
        )
    except PostgresUnavailable as exc:
        raise UserError(str(exc)) from exc
    if code:
        raise SystemExit(code)


if __name__ == "__main__":
    main()
