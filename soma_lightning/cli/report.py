"""`soma-lightning report`: plots and a markdown summary of a run."""

from json import dumps


def report(run_dir: str, out: str | None = None) -> None:
    """Plots and a markdown summary of a run: loss curves, throughput, the resolved spec.

    Args:
        run_dir: a run directory, runs/NAME/version_N
        out: where to write the report (default RUN_DIR/report)
    """
    from soma_lightning.report import write_report  # matplotlib, imported by this command only

    print(dumps(write_report(run_dir, out)))
