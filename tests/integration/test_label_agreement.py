"""The digit classifier that judges samples, and the label agreement a short run reports."""

import json

import pytest
import torch

from recipes.config import apply_overrides, get_recipe
from recipes.label_agreement import HELD_OUT, _split, accuracy, classifier_for_run, label_agreement

SHORT = [
    "model.overrides.hidden_size=32", "model.overrides.depth=1", "model.overrides.num_heads=2",
    "train.steps=2", "train.global_batch=8", "train.log_every=1", "train.ckpt_every=2",
    "train.num_sample_images=10", "diffusion.sample_steps=2", "budget.group_size=4", "optim.warmup_steps=0",
]


@pytest.fixture(scope="module")
def digits():
    from chunkformer.data import load_mnist_digits, mnist_digits_path

    try:
        mnist_digits_path()
    except FileNotFoundError as err:
        pytest.skip(str(err))
    return load_mnist_digits()


@pytest.fixture(scope="module")
def short_run(digits, tmp_path_factory):
    from recipes.train import train

    root = tmp_path_factory.mktemp("runs")
    overrides = [*SHORT, f"train.results_dir={root}", "train.run_name=short"]
    cfg = apply_overrides(get_recipe("tiny-cpu"), overrides)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:  # the probe records the thread count the run steps with
        train(cfg, probe=lambda model, step: {"threads": float(torch.get_num_threads())})
        after = torch.get_num_threads()
    finally:
        torch.set_num_threads(threads)
    return root / "short", after


def test_short_run_reports_label_agreement_and_its_ceiling(short_run):
    short_run, _ = short_run
    metrics = json.loads((short_run / "metrics.json").read_text())
    assert 0.0 <= metrics["label_agreement"] <= 1.0
    assert 0.9 < metrics["classifier_heldout_accuracy"] <= 1.0
    assert (short_run / "classifier" / "digit_classifier.safetensors").is_file()


def test_tiny_cpu_steps_on_its_cpu_threads_and_gives_the_caller_its_own_back(short_run):
    short_run, after = short_run
    logged = [json.loads(line) for line in (short_run / "metrics.jsonl").read_text().splitlines()]
    threads = [row["threads"] for row in logged if "threads" in row]
    assert threads and set(threads) == {float(get_recipe("tiny-cpu").train.cpu_threads)}
    assert after == 2


def test_classifier_reads_held_out_digits_and_agreement_follows_the_labels(short_run, digits):
    short_run, _ = short_run
    images, labels = digits
    clf, stored = classifier_for_run(short_run)  # the run's cached judge, loaded from safetensors
    _, held = _split(labels)
    assert len(held) == HELD_OUT
    acc = accuracy(clf, images[held], labels[held])
    assert acc > 0.9 and acc == pytest.approx(stored)
    assert label_agreement(clf, images[held], labels[held]) == pytest.approx(acc)
    assert label_agreement(clf, images[held], (labels[held] + 1) % 10) < 0.1  # wrong labels: rarely agreed
    with pytest.raises(ValueError, match=r"\(N, 1, 32, 32\)"):
        label_agreement(clf, torch.zeros(2, 4, 16, 16), torch.zeros(2, dtype=torch.long))


def test_cpu_threads_below_zero_is_refused_with_its_meaning():
    from recipes.validate import ConfigError

    cfg = apply_overrides(get_recipe("tiny-cpu"), ["train.cpu_threads=-1"])
    with pytest.raises(ConfigError, match=r"train\.cpu_threads.*0 = torch's default"):
        cfg.validate(data=False, outputs=False)
    assert apply_overrides(get_recipe("tiny-cpu"), ["train.cpu_threads=0"]).validate(data=False, outputs=False)
