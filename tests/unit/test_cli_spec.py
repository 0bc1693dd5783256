"""``ftops train --spec``: YAML keys, types and the JobSpec they become."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from ftops_cli.app import app
from ftops_cli.errors import EXIT_USAGE, CliError
from ftops_cli.spec import build_job_spec, load_spec_file, validate


def _write(tmp_path: Path, text: str) -> Path:
    (tmp_path / "data.jsonl").write_text('{"prompt": "a", "completion": "b"}\n')
    spec = tmp_path / "spec.yaml"
    spec.write_text(text)
    return spec


def test_full_spec_becomes_a_job_spec(tmp_path: Path) -> None:
    spec = _write(
        tmp_path,
        "adapter: bot\ndataset: data.jsonl\nparent_version: ver_1\nlora_r: 8\n"
        "lora_alpha: 16\nlora_dropout: 0.1\nlora_target: [q_proj, v_proj]\n"
        "learning_rate: 2e-4\nnum_epochs: 2\nbatch_size: 4\ncutoff_len: 128\nseed: 7\n"
        "max_steps: 30\n",
    )
    job = build_job_spec(load_spec_file(spec))
    assert (job.adapter, job.base_model, job.parent_version_id) == ("bot", "tiny-llama", "ver_1")
    assert job.dataset_jsonl.startswith(b'{"prompt"')
    assert (job.lora.r, job.lora.alpha, list(job.lora.target_modules)) == (
        8,
        16,
        ["q_proj", "v_proj"],
    )
    assert job.lora.dropout == pytest.approx(0.1)
    hp = job.hyperparameters
    assert hp.learning_rate == pytest.approx(2e-4)  # YAML 1.1 reads 2e-4 as a string
    assert (hp.num_epochs, hp.batch_size, hp.cutoff_len, hp.seed, hp.max_steps) == (
        2,
        4,
        128,
        7,
        30,
    )


@pytest.mark.parametrize(
    ("value", "expected"),
    [("q_proj,v_proj", ["q_proj", "v_proj"]), (" q_proj ", ["q_proj"]), (["o_proj"], ["o_proj"])],
)
def test_lora_target_forms(value: object, expected: list[str]) -> None:
    assert validate({"lora_target": value})["lora_target"] == expected


@pytest.mark.parametrize(
    ("values", "fragment"),
    [
        ({"lora_rank": 8}, r"unknown key 'lora_rank' \(did you mean 'lora_r'"),
        ({"lora_r": "eight"}, "'lora_r' must be a non-negative integer"),
        ({"lora_r": True}, "'lora_r' must be a non-negative integer"),
        ({"max_steps": -1}, "'max_steps' must be a non-negative integer"),
        ({"learning_rate": "fast"}, "'learning_rate' must be a non-negative number"),
        ({"lora_target": [1, 2]}, "'lora_target' must be a list"),
        ({"adapter": ""}, "'adapter' must be a non-empty string"),
    ],
)
def test_bad_values_name_the_key(values: dict[str, object], fragment: str) -> None:
    with pytest.raises(CliError, match=fragment) as err:
        validate(values, "spec.yaml")
    assert err.value.exit_code == EXIT_USAGE
    assert str(err.value).startswith("spec.yaml: ")


def test_missing_required_keys(tmp_path: Path) -> None:
    with pytest.raises(CliError, match="missing 'dataset'"):
        build_job_spec(validate({"adapter": "bot"}))
    with pytest.raises(CliError, match="cannot read dataset"):
        build_job_spec(validate({"adapter": "bot", "dataset": str(tmp_path / "nope.jsonl")}))


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("adapter: bot\nlora_rank: 8\n", "unknown key 'lora_rank'"),
        ("adapter: [bot\n", "invalid YAML at line"),
        ("- adapter\n", "must be a mapping"),
        ("adapter: bot\nnum_epochs: 1.5\n", "'num_epochs' must be a non-negative integer"),
    ],
)
def test_cli_reports_bad_spec_in_one_line(tmp_path: Path, text: str, fragment: str) -> None:
    spec = _write(tmp_path, text)
    result = CliRunner().invoke(app, ["--trainer", "127.0.0.1:1", "train", "--spec", str(spec)])
    assert result.exit_code == EXIT_USAGE
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("error: ")
    assert fragment in lines[0]


def test_cli_missing_spec_file(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["train", "--spec", str(tmp_path / "missing.yaml")])
    assert result.exit_code == EXIT_USAGE
    assert "cannot read spec" in result.stderr


def test_flags_override_spec(tmp_path: Path) -> None:
    spec = _write(tmp_path, "adapter: bot\ndataset: data.jsonl\nmax_steps: 30\n")
    values = load_spec_file(spec)
    values.update(validate({"max_steps": 5, "adapter": None}))
    job = build_job_spec(values)
    assert (job.adapter, job.hyperparameters.max_steps) == ("bot", 5)


def test_method_data_replay_and_gate_keys(tmp_path: Path) -> None:
    (tmp_path / "d.jsonl").write_text('{"text": "x"}\n')
    spec_file = tmp_path / "s.yaml"
    spec_file.write_text(
        "adapter: bot\ndataset: d.jsonl\nfinetuning_type: adalora\ntarget_r: 4\n"
        "use_rslora: true\nlr_scheduler_type: cosine\nwarmup_ratio: 0.1\n"
        "gradient_accumulation_steps: 2\nmax_grad_norm: 0.0\nsave_steps: 25\n"
        "world_size: 2\nparallelism: fsdp\nregularization: ewc\nregularization_weight: 0.5\n"
        "train_on_prompt: true\noverlong: refuse\nnear_dup_threshold: 0.9\n"
        "balance_targets: {faq: 1, orders: 3}\ndecay_half_life_days: 7\n"
        "replay_ratio: 0.0\nreplay_capacity: 500\nmin_retention: 0.9\ngate: false\n"
    )
    spec = build_job_spec(load_spec_file(spec_file))
    assert (spec.method, spec.lora.target_r, spec.lora.use_rslora) == ("adalora", 4, True)
    hp = spec.hyperparameters
    assert (hp.lr_scheduler, hp.grad_accum_steps, hp.checkpoint_every) == ("cosine", 2, 25)
    assert hp.HasField("max_grad_norm")
    assert hp.max_grad_norm == 0.0
    assert (hp.world_size, hp.parallelism, hp.regularization, hp.regularization_weight) == (
        2,
        "fsdp",
        "ewc",
        0.5,
    )
    assert spec.data.train_on_prompt
    assert spec.data.overlong == "refuse"
    assert dict(spec.data.balance_targets) == {"faq": 1.0, "orders": 3.0}
    # An explicit 0 is kept (no replay), not mistaken for "use the default".
    assert spec.replay.HasField("ratio")
    assert spec.replay.ratio == 0.0
    assert spec.gate.disabled
    assert spec.gate.min_retention == 0.9


def test_method_and_its_alias_conflict(tmp_path: Path) -> None:
    (tmp_path / "d.jsonl").write_text('{"text": "x"}\n')
    with pytest.raises(CliError, match="not both"):
        build_job_spec(
            {
                "adapter": "a",
                "dataset": str(tmp_path / "d.jsonl"),
                "method": "ia3",
                "finetuning_type": "lora",
            }
        )
