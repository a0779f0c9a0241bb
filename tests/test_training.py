"""Training runs, saves, and resumes from its checkpoint instead of starting over."""

import json
from pathlib import Path

import pytest
from conftest import needs_torch

TINY = dict(  # a run of a few seconds: one subject of each generator
    model="denseunet",
    subjects=1,
    slices_per_subject=2,
    randomised_subjects=2,
    randomised_slices=2,
    validation_subjects=1,
    batch_size=2,
)


def test_training_saves_weights_and_resumes_from_the_checkpoint(tmp_path):
    needs_torch()
    import torch

    from thighseg.learning import models
    from thighseg.learning.training import TrainConfig, train, training_history

    config = TrainConfig(**TINY, steps=3)
    out = tmp_path / "denseunet.pt"
    first = train(config, out=out)
    assert set(first["validation"]) == {"extensor", "flexor", "adductor"}
    assert set(first["validation_randomised"]) == {"extensor", "flexor", "adductor"}
    card = out.with_suffix(".md").read_text()
    assert first["sha256"][:16] in card and "--randomised-subjects 2" in card
    assert "torch" in first["versions"]
    checkpoint = torch.load(out.with_suffix(".ckpt"), weights_only=False)
    assert checkpoint["step"] == 3
    weights = torch.load(out, weights_only=True)["state_dict"]
    again = train(config, out=out)  # nothing left to do: resumes at step 3 of 3
    resumed = torch.load(out, weights_only=True)["state_dict"]
    assert all(torch.equal(weights[k], resumed[k]) for k in weights)
    assert again["validation"] == first["validation"]
    network = models.load_trained("denseunet", out)
    tuned = train(TrainConfig(**{**config.__dict__, "init": str(out)}), out=tmp_path / "tuned.pt")
    changed = torch.load(tmp_path / "tuned.pt", weights_only=True)["state_dict"]
    assert tuned["config"]["init"] == str(out)
    assert any(not torch.equal(weights[k], changed[k]) for k in weights), "fine-tuning moved"
    assert [step["sha256"] for step in tuned["history"]] == [first["sha256"]]
    assert "Fine-tuned from the result of" in (tmp_path / "tuned.md").read_text()
    lineage = training_history(tmp_path / "tuned.pt")  # what a further fine-tune records
    assert [step["sha256"] for step in lineage] == [first["sha256"], tuned["sha256"]]
    assert network(torch.zeros(1, 1, 64, 64)).shape == (1, 4, 64, 64)


def test_every_registered_model_has_the_same_contract():
    needs_torch()
    import torch

    from thighseg.learning import models

    for name in models.BUILDERS:
        with torch.no_grad():
            assert models.build(name).eval()(torch.zeros(1, 1, 256, 256)).shape == (
                1,
                4,
                256,
                256,
            ), name


def test_2p5d_training_starts_as_the_2d_model_and_serves_only_as_what_it_is(tmp_path):
    needs_torch()
    import numpy as np
    import pytest
    import torch

    from thighseg.learning import models
    from thighseg.learning.training import TrainConfig, train

    flat = models.load_trained("segformer")  # shipped 2D weights
    inflated = models.load_trained("segformer", context=1)
    assert (models.context_of(flat), models.context_of(inflated)) == (0, 1)
    centre = torch.randn(2, 1, 64, 64)
    neighbours = torch.cat([torch.randn(2, 1, 64, 64), centre, torch.randn(2, 1, 64, 64)], 1)
    with torch.no_grad():
        assert torch.allclose(flat(centre), inflated(neighbours), atol=1e-5)
    flat_weights = tmp_path / "denseunet_2d.pt"
    assert train(TrainConfig(**TINY, steps=1), out=flat_weights)["config"]["context"] == 0
    config = TrainConfig(**TINY, steps=2, init=str(flat_weights), context=1)
    out = tmp_path / "denseunet_2p5d.pt"
    summary = train(config, out=out)
    assert summary["config"]["context"] == 1
    card = out.with_suffix(".md").read_text()
    assert "3 × 256 × 256" in card and "--context 1" in card
    trained = models.load_trained("denseunet", out)
    assert models.context_of(trained) == 1
    with torch.no_grad():
        assert trained(torch.zeros(1, 3, 64, 64)).shape == (1, 4, 64, 64)
    with pytest.raises(ValueError, match="only 2D weights can start"):
        models.load_trained("denseunet", out, context=2)
    again = train(  # fine-tuning 2.5D weights keeps their input without being told
        TrainConfig(**{**config.__dict__, "init": str(out), "context": None}),
        out=tmp_path / "again.pt",
    )
    assert again["config"]["context"] == 1
    assert np.isfinite(list(summary["validation_randomised"].values())).all()


@pytest.mark.parametrize("model", ["denseunet", "manet", "segformer"])
def test_each_shipped_card_is_what_its_summary_and_the_evaluation_run_render(model):
    from thighseg.learning import models
    from thighseg.learning.card import render

    # hand edits would be lost the next time a card is written: what a card says beyond the
    # training record (why the weights were adopted) lives in the summary JSON
    summary = json.loads((models.WEIGHTS_DIR / f"{model}.json").read_text())
    evaluation_json = Path(__file__).parents[1] / "docs" / "evaluation" / "evaluation.json"
    evaluation = json.loads(evaluation_json.read_text())
    card = (models.WEIGHTS_DIR / f"{model}.md").read_text()
    assert card == render(summary, evaluation)
    if summary.get("adoption"):
        assert summary["adoption"] in card
