"""Planning: the paper grids' exact trial and prerequisite counts, shared prerequisites, keys."""

from __future__ import annotations

from collections import Counter

import yaml
from typer.testing import CliRunner

from sweeps.cli import app
from sweeps.core.plan import build_plan
from sweeps.core.spec import load_spec, parse_spec

SEEDS = 5


def test_paper_table2_counts_match_the_method_grid(tmp_path, monkeypatch) -> None:
    plan = build_plan(load_spec("paper-table2"))
    # 12 ablation rows x {STE, BNEW}, minus R_l1 and R_l2 with STE: 22 quantise trials per seed.
    quantise = (12 * 2 - 2) * SEEDS
    real = 1 * SEEDS  # the real-valued row
    # Pretrained models per seed: one per architecture variant and distillation. Rows with their
    # own network: baseline, no_learnable_bias, no_prelu, no_scale, classic_ste,
    # binary_first_last, binary_bottlenecks, no_scale_classic_ste (8), plus no_distillation
    # (the baseline network, not distilled). R_l1/R_l2 reuse the baseline's; no_pretrain has none.
    pretrain = 9 * SEEDS
    teacher = 1 * SEEDS  # CIFAR-100, one per seed
    assert len(plan.of_phase("quantise")) == quantise == 110
    assert len(plan.of_phase("real")) == real
    assert len(plan.of_phase("pretrain")) == pretrain == 45
    assert len(plan.of_phase("teacher")) == teacher
    assert len(plan.trial_roles()) == quantise + real == 115
    assert plan.epochs() == 200 * (quantise + real + pretrain + teacher)

    # `plan` checks the dataset root (data/cifar100 under BNEW_DATA_DIR) exists.
    (tmp_path / "data" / "cifar100").mkdir(parents=True)
    monkeypatch.setenv("BNEW_DATA_DIR", str(tmp_path))
    result = CliRunner().invoke(app, ["sweep", "plan", "paper-table2", "--no-lookup"])
    assert result.exit_code == 0, result.output
    assert "115 trials, 50 prerequisites; 33000 trial-epochs" in result.output


def test_paper_table1_and_main_counts() -> None:
    table1 = build_plan(load_spec("paper-table1"))
    # 4 optimisers x distillation {no, yes} x budgets {200, 1000} x 5 seeds.
    assert len(table1.of_phase("quantise")) == 4 * 2 * 2 * SEEDS
    # The pretrained model depends on distillation and seed, not on the optimiser or the budget.
    assert len(table1.of_phase("pretrain")) == 2 * SEEDS
    assert len(table1.of_phase("teacher")) == SEEDS
    assert table1.epochs() == 4 * 2 * SEEDS * (200 + 1000) + 2 * SEEDS * 200 + SEEDS * 200
    main = build_plan(load_spec("paper-main"))
    assert Counter(stage.phase for stage in main.stages.values()) == {"quantise": 160, "pretrain": 20, "teacher": 10}


def test_every_optimiser_of_a_seed_shares_one_pretrained_model_and_teacher() -> None:
    plan = build_plan(load_spec("demo"))
    by_seed: dict[int, set[tuple[str, str]]] = {}
    for stage in plan.of_phase("quantise"):
        by_seed.setdefault(stage.config["seed"], set()).add(
            (stage.inputs["init_checkpoint"], stage.inputs["teacher_checkpoint"])
        )
    assert all(len(inputs) == 1 for inputs in by_seed.values()) and len(by_seed) == 2
    pretrain = plan.stages[next(iter(by_seed[0]))[0]]
    assert pretrain.phase == "pretrain" and pretrain.inputs["teacher_checkpoint"] == next(iter(by_seed[0]))[1]
    # Inputs come before the stages that use them.
    order = list(plan.stages)
    assert all(order.index(i) < order.index(key) for key, stage in plan.stages.items() for i in stage.inputs.values())


def test_names_and_tags_follow_the_conventions() -> None:
    plan = build_plan(load_spec("paper-table2"))
    names = {role.name: role for role in plan.trial_roles()}
    role = names["table2/bnew/no_prelu/seed3"]
    assert role.tags == {
        "bnew.grid": "table2", "bnew.stage": "quantise", "bnew.dataset": "cifar100", "bnew.optimiser": "bnew",
        "bnew.ablation": "no_prelu", "bnew.seed": "3", "bnew.budget": "200", "bnew.distillation": "yes",
    }
    real = names["table2/real/baseline/seed0"]
    assert real.tags["bnew.stage"] == "real" and real.tags["bnew.distillation"] == "no"
    assert "table2/pretrain/baseline/seed0" in {s.name for s in plan.of_phase("pretrain")}
    table1 = {role.name for role in build_plan(load_spec("paper-table1")).trial_roles()}
    assert "table1/bop/baseline/budget1000/distill/seed4" in table1


def test_keys_depend_on_content_only() -> None:
    table1 = build_plan(load_spec("paper-table1"))
    table2 = build_plan(load_spec("paper-table2"))
    # Table 2's baseline and no_distillation rows are Table 1's 200-epoch runs: same keys, so a
    # stage trained by one sweep is reused by the other.
    shared = set(table1.stages) & set(table2.stages)
    assert Counter(table2.stages[key].phase for key in shared) == {"teacher": 5, "pretrain": 10, "quantise": 20}
    capped = build_plan(load_spec("paper-table2"), max_epochs=2, max_batches=1)
    assert not set(capped.stages) & set(table2.stages)
    assert all(stage.epochs <= 2 for stage in capped.stages.values())


def test_params_axes_cross_only_the_optimisers_that_have_the_field() -> None:
    spec = parse_spec(yaml.safe_load("""
        name: lr-sweep
        axes:
          dataset: [synthetic]
          optimiser: [ste, bnew]
          seed: [0]
          budget: [3]
          params: {lr: [0.01, 0.02], optimiser.lambda_rate: [1.0, 2.0, 4.0]}
        optimisers: {bnew: {freeze_epochs: 1}}
        exclude: [{optimiser: bnew, params: {lr: 0.02}}]
    """), "inline")
    plan = build_plan(spec)
    roles = sorted(role.name for role in plan.trial_roles())
    assert len(roles) == 2 + 3  # ste x 2 lr; bnew x 3 lambda_rate at lr 0.01
    assert "lr-sweep/bnew/baseline/lr=0.01/lambda_rate=2.0/seed0" in roles
    assert len(plan.of_phase("pretrain")) == 1  # params apply to the final stage only


def test_a_search_is_counted_as_the_trials_it_runs(tmp_path, monkeypatch) -> None:
    """Optuna tuning: per cell, `samples` suggestions, each trained on every seed of the cell;
    the cells' templates (the plan's final stages with the params at their settings) are not trials."""
    monkeypatch.setenv("BNEW_PROJECT_DIR", str(tmp_path))
    from sweeps.core.search import planned_counts, search_size, searched_templates

    text = """
name: searched
axes:
  optimiser: [bnew, ste]
  seed: [0, 1, 2]
  budget: [3, 5]
  params:
    optimiser.lambda_rate: {loguniform: [0.01, 10.0], samples: 1}
search: {algorithm: optuna, samples: 7}
base: {data: {val_size: 100}}
"""
    plan = build_plan(parse_spec(yaml.safe_load(text), "searched.yaml"))
    search = search_size(plan)
    # bnew has lambda_rate: 2 cells (budgets), each 7 suggestions x 3 seeds; ste is a grid.
    assert (search.cells, search.trials, search.epochs) == (2, 2 * 7 * 3, 21 * 3 + 21 * 5)
    assert len(searched_templates(plan)) == 2 * 3
    assert planned_counts(plan).trials == 2 * 21 + 2 * 3  # and ste: 2 budgets x 3 seeds
    spec_path = tmp_path / "searched.yaml"
    spec_path.write_text(text)
    shown = CliRunner().invoke(app, ["sweep", "plan", str(spec_path), "--no-lookup"])
    assert shown.exit_code == 0, shown.output
    assert "search (2 cells)" in shown.stdout and f"{2 * 21 + 2 * 3} trials" in shown.stdout


def test_an_oversized_grid_is_refused_naming_its_largest_axes(tmp_path, monkeypatch) -> None:
    """A mistyped seed range (3,000 seeds of the demo's 4 optimisers): one line, exit 2, naming the
    axis that makes the grid so large and its count, largest first; single-valued axes are not named."""
    monkeypatch.setenv("BNEW_PROJECT_DIR", str(tmp_path))
    seeds = ",".join(map(str, range(3000)))
    refused = CliRunner().invoke(app, ["sweep", "plan", "demo", "--set", f"axes.seed=[{seeds}]", "--no-lookup"])
    assert refused.exit_code == 2 and refused.stdout == ""
    assert refused.stderr == ("error: axes: 12000 trials, more than 1000 (axes.seed has 3000 values, axes.optimiser "
                              "has 4 values); a mistyped axis? `--yes` plans and runs a grid this size\n")
