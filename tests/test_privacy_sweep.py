"""Privacy-budget sweep: same federation per epsilon, CSV and plot."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest

from fedcollm_secure.cli import main
from fedcollm_secure.cotuning.models import save_tiny_model
from fedcollm_secure.errors import ConfigError
from fedcollm_secure.privacy.sweep import _with_epsilon, parse_epsilons

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_parse_epsilons() -> None:
    assert parse_epsilons("1, 2,inf") == [1.0, 2.0, math.inf]
    for bad in ("", "0", "-1", "x", "1,1"):
        with pytest.raises(ConfigError):
            parse_epsilons(bad)


def test_epsilon_goes_to_the_configured_mechanism() -> None:
    cfg, mech = _with_epsilon({"privacy": {"dpsgd": {"noise_multiplier": 1.0}}}, 2.0)
    assert mech == "dpsgd" and cfg["privacy"]["dpsgd"] == {"target_epsilon": 2.0}
    cfg, mech = _with_epsilon({"privacy": {"ddp": {"clip": 0.1, "noise_multiplier": 1}}}, 3.0)
    assert mech == "ddp" and cfg["privacy"]["ddp"] == {"clip": 0.1, "target_epsilon": 3.0}


def test_sweep_cli_writes_csv_and_plot(tmp_path: Path) -> None:
    llm = save_tiny_model(tmp_path / "llm", "llama", seed=3, hidden=48, layers=2)
    slm = save_tiny_model(tmp_path / "slm", "llama", seed=4, hidden=32, layers=1)
    (tmp_path / "sweep.toml").write_text(f"""
llm = {{ source = "{llm}" }}
slm = {{ source = "{slm}" }}
rounds = 1
n_clients = 2
aggregator = "plaintext"
lora = {{ r = 4, alpha = 8, dropout = 0.0 }}
train = {{ batch_size = 8, learning_rate = 0.01, schedule = "constant" }}
distill_train = {{ batch_size = 8, max_steps = 1 }}
data = {{ limit = 40, eval_limit = 8, client_eval_limit = 0, max_length = 64 }}
[privacy.dpsgd]
max_grad_norm = 1.0
target_epsilon = 1.0
""")
    with pytest.warns(UserWarning):  # plaintext
        rc = main(["sweep", "--config", str(tmp_path / "sweep.toml"), "--epsilons", "4,inf",
                   "--out", str(tmp_path / "out")])
    assert rc == 0
    rows = list(csv.DictReader((tmp_path / "out" / "sweep.csv").open()))
    assert [r["epsilon"] for r in rows] == ["4.0", "inf"]
    assert 0 < float(rows[0]["epsilon_spent"]) <= 4.0 and float(rows[1]["epsilon_spent"]) == 0
    assert all(0 <= float(r["slm_acc"]) <= 1 for r in rows)
    assert (tmp_path / "out" / "sweep.png").stat().st_size > 1000
