"""bench/quality.py's bookkeeping (no training): the issues' bars are judged from unrounded numbers, step
overrides and method subsets are validated, partial digits runs merge per method, and each method's config
is the recipe docs/quality.md describes."""
import json
import os
import sys

import pytest

from cmjax import methods

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))

import quality  # noqa: E402


def _scores(frechet, confident, class_min=0.08, class_max=0.12):
    return {"frechet": frechet, "confident": confident, "class_min": class_min, "class_max": class_max}


def _method(one, two, steps=3000):
    return {"one_step": one, "two_step_default": two, "two_step_chosen": two, "middle_sigma": 0.4,
            "selection": {"0.4": two["frechet"]}, "steps": steps, "train_seconds": 1.0, "seconds": 2.0}


def _digits(ict_one):
    ok = _method(_scores(9.0, 0.7), _scores(7.0, 0.75))
    return {"floor": {"frechet": 3.2, "confident_fraction": 0.95, "class_fractions": [0.1] * 10},
            "edm": {"teacher": _scores(3.7, 0.82), "nfe": 35, "steps": 3000, "train_seconds": 1.0},
            "cd": ok, "ct": _method(_scores(20.0, 0.6), _scores(24.0, 0.58)), "ect": ok,
            "ict": _method(ict_one, _scores(4.8, 0.84), steps=18000)}


def _merged_report(tmp_path, parts) -> str:
    """`merge_reports` over `parts` written as the --json files the bench writes; returns the report."""
    paths = []
    for i, part in enumerate(parts):
        paths.append(str(tmp_path / f"{i}.json"))
        with open(paths[-1], "w") as f:
            json.dump(part, f)
    out = tmp_path / "report.md"
    quality.merge_reports(paths, str(out))
    return out.read_text()


def test_digits_bars_use_unrounded_fractions():
    # 79.6 % prints as "80%" with no decimals; the bar must still say NO. 15.2 % of one class misses 5–15 %.
    notes = dict(n.split(": ", 1) for n in quality.checks_digits(_digits(_scores(5.6, 0.7959, 0.07, 0.152))))
    assert notes["ict"] == "2-step < 1-step: yes, 1-step ≥ 80 % confident: NO, classes within 5–15 %: NO"
    assert notes["ct"] == "2-step < 1-step: NO"
    notes = dict(n.split(": ", 1) for n in quality.checks_digits(_digits(_scores(5.3, 0.803, 0.076, 0.15))))
    assert notes["ict"] == "2-step < 1-step: yes, 1-step ≥ 80 % confident: yes, classes within 5–15 %: yes"
    table = quality.markdown({"eval_samples": 16, "digits": _digits(_scores(5.6, 0.7959))}, ["cmd"], 1.0, (0, 0, 0))
    assert "| 79.6% |" in table


def test_parse_steps_and_unknown_methods():
    assert quality.parse_steps("", {"cd": 3, "ict": 5}) == {"cd": 3, "ict": 5}
    assert quality.parse_steps("7", {"cd": 3, "ict": 5}) == {"cd": 7, "ict": 7}
    assert quality.parse_steps("ict=9", {"cd": 3, "ict": 5}) == {"cd": 3, "ict": 9}
    with pytest.raises(ValueError, match="Unknown method"):
        quality.parse_steps("ictt=9", {"cd": 3, "ict": 5})
    with pytest.raises(ValueError, match="Unknown digits method"):
        quality.run_digits("/nonexistent", 0, quality.DIGITS_STEPS, methods=["edm", "lcm"])


def test_merge_takes_rerun_digits_methods_per_method(tmp_path):
    first = {"eval_samples": 16, "digits": _digits(_scores(5.6, 0.7959)), "command": "a", "wall": 10.0,
             "load": [1, 1, 1]}
    first["digits"]["ct"]["train_seconds"] = 497.0
    rerun = {"eval_samples": 16, "command": "b", "wall": 20.0, "load": [2, 2, 2],
             "digits": {"edm": dict(first["digits"]["edm"], teacher=_scores(2.9, 0.9)),
                        "cd": _method(_scores(6.0, 0.8), _scores(5.0, 0.85))}}
    # A --digits_score_only part: new scores on more samples, no training time of its own.
    ct_rescored = {k: v for k, v in _method(_scores(23.7, 0.576), _scores(20.5, 0.593)).items()
                   if k != "train_seconds"}
    rescore = {"eval_samples": 16, "command": "c", "wall": 1.0, "load": [1, 1, 1],
               "digits": {"samples": 4096, "ct": ct_rescored}}
    assert quality._seconds(ct_rescored) == "—"
    report = _merged_report(tmp_path, (first, rerun, rescore))
    assert "| edm teacher (35 evaluations) | 3000 | 2.9 | 90.0% |" in report  # the rerun's teacher
    assert "| ict | 18000 | 5.6 | 79.6% |" in report  # kept from the first part
    assert "| cd | 3000 | 6.0 | 80.0% |" in report
    assert "| ct | 3000 | 23.7 | 57.6% |" in report and report.split("| ct |")[1].split("\n")[0].endswith(
        "| 497 |")  # the rescoring's numbers with the training run's seconds
    assert "EMA 0.998, 4096 samples" in report
    assert "Wall time: 0.3 min" in report


def test_digits_method_configs():
    teacher = "/runs/edm"
    edm = quality.digits_method_config("edm", 100, teacher)
    assert (edm.method.name, edm.optim.decay, edm.total_steps) == ("edm", "constant", 100)
    ict = quality.digits_method_config("ict", 100, teacher)
    assert (ict.method.name, ict.optim.decay) == ("ict", "cosine")  # configs/digits.py as `make demo` runs it
    cd = quality.digits_method_config("cd", 100, teacher)
    assert (cd.teacher.workdir, cd.method.cd.weighting, cd.optim.decay) == (teacher, "karras", "cosine")
    assert cd.teacher.init_student is None and methods.starts_from_teacher(cd)  # as the CM releases
    assert quality.digits_method_config("ect", 100, teacher).teacher.workdir == teacher
    # sCD's teacher trains EDM's objective with TrigFlow's time input; sCD starts from its weights.
    tf = quality.digits_method_config("edm_trigflow", 100, teacher)
    assert (tf.method.name, tf.method.edm.parameterization_kind, tf.optim.decay) == ("edm", "trigflow", "constant")
    scd = quality.digits_method_config("scd", 100, teacher)
    assert (scd.teacher.workdir, scd.teacher.init_student, scd.method.scd.parameterization_kind) == (
        teacher, True, "trigflow")
    with pytest.raises(ValueError, match="Unknown method"):
        quality.digits_method_config("lcm", 100, teacher)


def _ring_run(teacher, cd_one, ict_one):
    def method(one, two):
        return {"one_step": one, "two_step_default": two, "two_step_chosen": two, "middle_sigma": 0.2,
                "selection": {"0.2": two}, "steps": 10, "seconds": 1.0}
    return {"floor": 0.011, "edm": {"teacher": teacher, "nfe": 35, "steps": 10, "seconds": 1.0},
            "cd": method(cd_one, 0.9 * cd_one), "ct": method(0.15, 0.08), "ict": method(ict_one, 0.02),
            "ect": method(0.09, 0.03)}


def test_2d_bars_are_judged_on_the_means_over_merged_seeds(tmp_path):
    # Seed 0 alone: iCT 0.030 against a teacher of 0.013 (2.31×, NO). With seed 1 (0.031 against 0.019,
    # 1.63×) the means are 0.0305 / 0.016 = 1.91×: yes. A ratio averaged per seed would say the same here,
    # so the CD numbers tell the two apart: per seed 2.1× and 1.0× average 1.55×, the means give 1.45×.
    seed0 = {"eval_samples": 16, "ring": _ring_run(0.013, 0.0273, 0.030), "command": "a", "wall": 60.0,
             "load": [1, 1, 1]}  # no "seed": an older part, seed 0
    seed1 = {"eval_samples": 16, "seed": 1, "ring": _ring_run(0.019, 0.019, 0.031), "command": "b",
             "wall": 120.0, "load": [1, 1, 1]}
    notes = dict(n.split(": ", 1) for n in quality.checks_2d(quality._by_seed([seed0])["ring"]))
    assert notes["ict"].endswith("1-step ≤ 2× teacher: NO (2.31× on the means; per seed 2.31)")
    by_seed = quality._by_seed([seed0, seed1])["ring"]
    assert sorted(by_seed) == ["0", "1"]
    notes = dict(n.split(": ", 1) for n in quality.checks_2d(by_seed))
    assert notes["ict"] == ("2-step < 1-step: yes (2 of 2 seeds), "
                            "1-step ≤ 2× teacher: yes (1.91× on the means; per seed 2.31, 1.63)")
    assert "(1.45× on the means; per seed 2.10, 1.00)" in notes["cd"]
    report = _merged_report(tmp_path, (seed0, seed1))
    assert "training seeds 0, 1" in report
    assert "| **mean** | **0.011** | **0.016** |" in report
    assert "| ict | 10 | 0.030 | 0.020 | 0.020 | 0.2, 0.2 | 1.91 | 2.31, 1.63 | 1 |" in report
    assert "Wall time: 2.0 min" in report


def test_digits_overrides_set_config_keys_and_reject_unknown_ones():
    config = quality.digits_method_config("cd", 3000, "/teacher")
    assert config.teacher.init_student is None and config.optim.decay == "cosine"
    quality.apply_overrides(config, ["teacher.init_student=True", "optim.learning_rate=1e-4",
                                     "optim.decay=constant", "method.cd.num_scales=40"])
    assert config.teacher.init_student is True and config.optim.learning_rate == 1e-4
    assert config.optim.decay == "constant" and config.method.cd.num_scales == 40
    for bad, match in (("optim.lr=1e-4", "no key 'optim.lr'"), ("nosuch.key=1", "no key"),
                       ("optim.learning_rate", "not key=value")):
        with pytest.raises(ValueError, match=match):
            quality.apply_overrides(config, [bad])
    # The report names the ablation beside the method.
    digits = _digits(_scores(5.6, 0.81))
    digits["cd"]["overrides"] = ["teacher.init_student=True"]
    table = quality.markdown({"eval_samples": 16, "digits": digits}, ["cmd"], 1.0, (0, 0, 0))
    assert "| cd (teacher.init_student=True) | 3000 |" in table
