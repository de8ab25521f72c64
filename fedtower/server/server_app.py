"""fedtower's Flower ServerApp: reads the run config and runs the federation."""

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedtower.config import RunSettings
from fedtower.logs import use_flower_logging
from fedtower.server.federation import run_federation

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    use_flower_logging()
    run_federation(grid, RunSettings.from_run_config(context.run_config))
