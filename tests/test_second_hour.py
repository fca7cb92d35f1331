"""A user's second hour: their own image folder, one ETA, a register/log mismatch refused, and a quiet console.

Each test names the point of the issue it checks; trainings are small and in-process where they can be.
"""

from fault_utils import DIGITS_CONFIG

from tools.train_net import main


# ---- MLFLOW.REGISTER_MODEL needs MLFLOW.LOG_MODEL -----------------------------------------------------------------
def test_registering_without_logging_the_model_is_refused_before_anything_is_written(run_dir, capfd):
    database = run_dir / "store" / "mlflow.db"
    store, empty_store = f"sqlite:///{database}", database.read_bytes()
    output_dir = run_dir / "output"
    code = main(["--config-file", str(DIGITS_CONFIG), "MLFLOW.REGISTER_MODEL", "mine", "MLFLOW.LOG_MODEL", "False",
                 "OUTPUT_DIR", str(output_dir), "MLFLOW.TRACKING_URI", store])

    assert code == 2
    assert capfd.readouterr().err.splitlines() == [
        "error: MLFLOW.REGISTER_MODEL 'mine' registers the logged model, but MLFLOW.LOG_MODEL is False; "
        "set MLFLOW.LOG_MODEL True, or leave MLFLOW.REGISTER_MODEL empty"]
    assert not output_dir.exists()
    assert database.read_bytes() == empty_store  # no experiment, no run
