"""fedtower's Flower ServerApp: reads the run config and runs the federation."""

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedtower.config import RunSettings
from fedtower.logs import flower_detail_to_file, use_flower_logging
from fedtower.server.federation import named_run, run_federation

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    use_flower_logging()
    settings = named_run(RunSettings.from_run_config(context.run_config))
    # `flwr run --stream` shows a line per round and the summary; Flower's detail is in the run dir.
    with flower_detail_to_file(settings.run_dir / "flower.log", verbose=settings.flower_detail == "console"):
        run_federation(grid, settings)
