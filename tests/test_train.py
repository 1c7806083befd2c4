"""Training loop: exact resume, the non-finite-loss guard, checkpoint contents and CLI errors."""

import json
from dataclasses import replace

import numpy as np
import pytest

from npdiff import checkpoint as ckpt
from npdiff import train as train_mod
from npdiff.cli import main
from npdiff.model import DEFAULT_MODEL_DIR, Model, ModelConfig
from npdiff.train import TrainArgs, TrainingError, train

TINY = TrainArgs(resolution=16, train_batch_size=3, max_train_steps=4, checkpointing_steps=2, lr_warmup_steps=1,
                 base_channels=8, channel_mult=(1, 2), attention_levels=(1,), num_groups=4, text_width=16,
                 text_layers=1, vocab_size=128, log_every=1, learning_rate=1e-3)


def _files(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_resume_continues_bit_for_bit(tmp_path):
    straight = tmp_path / "straight"
    train(replace(TINY, output_dir=str(straight)), progress=False)

    resumed = tmp_path / "resumed"
    train(replace(TINY, output_dir=str(resumed), max_train_steps=2), progress=False)
    train(replace(TINY, output_dir=str(resumed), resume_from_checkpoint="latest"), progress=False)

    a, b = _files(straight / "checkpoint-4"), _files(resumed / "checkpoint-4")
    assert a.keys() == b.keys()
    for name in a:
        if name == ckpt.STATE_FILE:   # holds the arguments, which differ in resume_from_checkpoint
            sa, sb = json.loads(a[name]), json.loads(b[name])
            assert (sa["step"], sa["rng"], sa["last_loss"]) == (sb["step"], sb["rng"], sb["last_loss"])
        else:
            assert a[name] == b[name], f"{name} differs after resuming"
    log_a = [json.loads(l) for l in (straight / "train_log.jsonl").read_text().splitlines()]
    log_b = [json.loads(l) for l in (resumed / "train_log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log_b] == [1, 2, 3, 4]
    assert [e["loss"] for e in log_a] == [e["loss"] for e in log_b]


def test_training_lowers_the_loss_and_exports_a_loadable_model(tmp_path):
    out = tmp_path / "run"
    final = train(replace(TINY, output_dir=str(out), max_train_steps=30, checkpointing_steps=30,
                          train_batch_size=8, learning_rate=3e-3, lr_warmup_steps=3, log_every=5), progress=False)
    model = Model.load(final)
    # the loss of one fixed batch (fixed timesteps, noise and caption dropout) before and after:
    # a paired comparison, not two noisy training batches
    args = replace(TINY, output_dir=str(out))
    source = train_mod.make_source(args)
    before = train_mod.build_model(args, source, np.random.default_rng(args.seed))  # the run's start
    images, captions = source.batch(np.random.default_rng(99), 64)
    schedule = model.config.schedule()
    loss0, _ = train_mod.train_step(before, args, schedule, images, captions, np.random.default_rng(7))
    loss1, _ = train_mod.train_step(model, args, schedule, images, captions, np.random.default_rng(7))
    assert loss1 < 0.8 * loss0, (loss0, loss1)
    ema = ckpt.load_tensors(out / "checkpoint-30" / ckpt.EMA_FILE)
    assert model.params.keys() == ema.keys()
    assert all(np.array_equal(model.params[k], ema[k]) for k in ema)   # the export holds the EMA weights


def test_train_defaults_build_the_shipped_network():
    """`train` with no shape flags trains the network that ships in npdiff/weights/."""
    shipped = ModelConfig.from_dict(json.loads((DEFAULT_MODEL_DIR / "config.json").read_text()))
    built = train_mod.model_config(TrainArgs())
    built.text_encoder.vocab_size = shipped.text_encoder.vocab_size  # set by the tokenizer a run trains
    built.text_encoder.max_length = built.max_length                  # as Model.init sets it
    assert built == shipped


def test_phrase_tokens_cut_captions_at_and_and_carry_gradients():
    """--phrase-tokens 2: the tokenizer's "and" is the separator, the context gains two phrase tokens
    (the word means of each object's phrase), and Model's text backward is the gradient through them."""
    from npdiff.nn.gradcheck import directional_check
    args = replace(TINY, phrase_tokens=2, vocab_size=256)   # 128 pieces spell "and" letter by letter
    source = train_mod.make_source(args)
    model = train_mod.build_model(args, source, np.random.default_rng(0))
    config = model.config.text_encoder
    assert config.phrase_tokens == 2 and config.phrase_separators == (model.tokenizer.word_id("and"),)
    model = Model(model.config, model.tokenizer, {k: v.astype(np.float64) for k, v in model.params.items()})
    prompts = ["a red circle on the left and a blue square on the right", "a green triangle", ""]
    context, mask, pooled, cache = model.encode_text(prompts)
    L = model.config.max_length
    assert context.shape == (3, L + 2, config.width)
    assert mask[:, L:].tolist() == [[True, True], [True, False], [True, False]]
    words = model.tokenizer.tokens(prompts[0])                  # [BOS] a red circle ... and ... [EOS]
    cut = words.index("and")
    np.testing.assert_allclose(context[0, L], context[0, :cut].mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(context[0, L + 1], context[0, cut + 1:len(words)].mean(axis=0), rtol=1e-12)

    rng = np.random.default_rng(1)
    Rc, Rp = rng.standard_normal(context.shape) * mask[..., None], rng.standard_normal(pooled.shape)
    grads = model.encode_text_backward(Rc, Rp, cache)

    def loss():
        ctx, _, pool, _ = model.encode_text(prompts)
        return float(np.sum(ctx * Rc) + np.sum(pool * Rp))

    names = sorted(grads)
    assert directional_check(loss, [model.text_params[k] for k in names], [grads[k] for k in names], rng,
                             along_gradient=True) <= 1e-6
    from npdiff.data.imagefolder import DataError
    with pytest.raises(DataError, match="does not hold as one word; train with --phrase-tokens 0"):
        train_mod.build_model(replace(TINY, phrase_tokens=2), source, np.random.default_rng(0))


def test_grounding_loss_reaches_the_training_step():
    """--grounding-loss: the shapes source gives masks, train_step adds the weighted loss on attention
    and its gradient; the same images without masks train as before; folder data is refused."""
    args = replace(TINY, grounding_loss=0.5)
    source = train_mod.make_source(args)
    model = train_mod.build_model(args, source, np.random.default_rng(0))
    images, captions, masks = source.batch(np.random.default_rng(3), 8, masks=True)
    again, _ = source.batch(np.random.default_rng(3), 8)
    assert np.array_equal(images, again) and masks.shape == (8, 2, 16, 16)
    captions[0] = "a red circle on the left and a blue square on the right"
    schedule = model.config.schedule()
    stats = {}
    grounded, g1 = train_mod.train_step(model, args, schedule, images, captions, np.random.default_rng(7),
                                        masks, stats)
    plain, g0 = train_mod.train_step(model, args, schedule, images, captions, np.random.default_rng(7))
    assert stats["grounding"] > 0 and grounded == pytest.approx(plain + 0.5 * stats["grounding"], rel=1e-9)
    assert not np.allclose(g0["unet.down.1.xattn.0.q.weight"], g1["unet.down.1.xattn.0.q.weight"])
    assert np.array_equal(g0["unet.conv_out.weight"], g1["unet.conv_out.weight"])   # downstream of no attention weight
    with pytest.raises(TrainingError, match="only --data shapes draws"):
        train_mod.make_source(replace(args, data="some/folder"))


def test_multiscale_snr_reaches_the_training_step():
    """The same batch, timesteps and noise: multiscale weighting only adds weight to coarse bands."""
    source = train_mod.make_source(TINY)
    model = train_mod.build_model(TINY, source, np.random.default_rng(0))
    images, captions = source.batch(np.random.default_rng(3), 8)
    schedule = model.config.schedule()
    plain, g_plain = train_mod.train_step(model, TINY, schedule, images, captions, np.random.default_rng(7))
    multi, g_multi = train_mod.train_step(model, replace(TINY, multiscale_snr=True), schedule, images, captions,
                                          np.random.default_rng(7))
    assert multi > plain and np.isfinite(multi)
    assert not np.allclose(g_plain["unet.conv_out.bias"], g_multi["unet.conv_out.bias"])


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    real_step = train_mod.train_step
    calls = {"n": 0}

    def failing_step(*args, **kw):
        calls["n"] += 1
        loss, grads = real_step(*args, **kw)
        return (float("nan") if calls["n"] == 3 else loss), grads

    monkeypatch.setattr(train_mod, "train_step", failing_step)
    out = tmp_path / "run"
    with pytest.raises(TrainingError, match=r"loss became nan at step 3.*checkpoint-2"):
        train(replace(TINY, output_dir=str(out)), progress=False)
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]
    assert not (out / "model").exists()
    Model.load(out / "checkpoint-2")          # intact and loadable


def test_resume_from_a_folder_that_is_not_a_checkpoint_is_a_clear_error(tmp_path, capsys):
    code = main(["train", "--output-dir", str(tmp_path / "o"), "--resume-from-checkpoint", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and "is not a training checkpoint" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("argv, needle", [
    (["train", "--resolution", "30"], "multiple of 8"),
    (["train", "--channel-mult", "1,x"], "comma-separated integers"),
    (["train", "--attention-levels", "5"], "must name levels"),
    (["train", "--base-channels", "12"], "do not fit together"),
    (["train", "--data", "/no/such/folder"], "neither 'shapes' nor a folder"),
    (["train", "--snr-floor", "6"], "must lie between 0 and --snr-gamma 5"),
    (["train", "--snr-gamma", "-1", "--snr-floor", "0"], "must not be negative"),
    (["train", "--prediction", "eps", "--snr-floor", "1"], "--snr-floor needs --prediction v or x0"),
    (["train", "--multiscale-snr", "--snr-gamma", "0"], "give --snr-gamma a positive value"),
    (["train", "--text-encoder-lr-scale", "0"], "must be positive; to keep the encoder as it starts"),
    (["train", "--text-encoder-lr-scale", "nan"], "--text-encoder-lr-scale nan must be positive"),
    (["train", "--text-embed-std", "0"], "--text-embed-std 0 must be a positive number"),
    (["train", "--text-embed-std", "inf"], "--text-embed-std inf must be a positive number"),
    (["train", "--text-rel-pos", "-1"], "--text-rel-pos -1 must be 0 (off) or a positive offset"),
    (["train", "--phrase-tokens", "-1"], "--phrase-tokens -1 must be 0 (off) or a number of phrases"),
    (["train", "--grounding-loss", "-1"], "--grounding-loss -1 must be a number >= 0"),
    (["train", "--grounding-loss", "0.1", "--data", "."], "only --data shapes draws"),
    (["train", "--text-rel-slope", "nan"], "--text-rel-slope nan must be a number >= 0"),
    (["train", "--learning-rate", "nan"], "--learning-rate nan must be positive"),
    (["train", "--lr-warmup-steps", "-5"], "must not be negative"),
    (["train", "--text-layers", "-1"], "must not be negative"),
    (["train", "--max-grad-norm", "-1"], "0 turns clipping off"),
    (["train", "--ema-decay", "1"], "must lie in [0, 1)"),
    (["train", "--text-width", "130"], "does not split into num_heads=4"),
    (["train", "--text-width", "0"], "--text-width 0 must be at least 1"),
    (["train", "--beta-schedule", "foo"], "invalid choice: 'foo'"),
])
def test_train_flag_errors(argv, needle, capsys, tmp_path):
    code = main(argv + ["--output-dir", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and needle in err and len(err.strip().splitlines()) == 1


def _resume_tiny_run_and_fail(out, capsys, *extra) -> str:
    """Resume the TINY run in `out` through the CLI; it must fail with one line of error (exit 2)."""
    argv = ["train", "--output-dir", str(out), "--resume-from-checkpoint", "latest", "--max-train-steps", "4",
            "--resolution", "16", "--train-batch-size", "3", "--lr-warmup-steps", "1", "--base-channels", "8",
            "--channel-mult", "1,2", "--attention-levels", "1", "--num-groups", "4", "--text-width", "16", "--text-layers", "1", *extra]
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1, err
    return err


@pytest.mark.parametrize("damage, needle", [
    ("optimizer-shape", "optimizer.safetensors does not match"),
    ("optimizer-missing", "optimizer.safetensors does not match"),
    ("ema-shape", "ema.safetensors does not match"),
    ("ema-gone", "has no ema.safetensors"),
])
def test_resume_checks_optimizer_and_ema_files(tmp_path, capsys, damage, needle):
    """A checkpoint whose optimizer or EMA tensors do not fit the model is one clear line (exit 2)."""
    out = tmp_path / "run"
    train(replace(TINY, output_dir=str(out), max_train_steps=2), progress=False)
    cp = out / "checkpoint-2"
    kind, _, how = damage.partition("-")
    path = cp / (ckpt.OPTIMIZER_FILE if kind == "optimizer" else ckpt.EMA_FILE)
    if how == "gone":
        path.unlink()
    else:
        tensors = ckpt.load_tensors(path)
        name = sorted(tensors)[0]
        if how == "shape":
            tensors[name] = np.zeros(tensors[name].shape + (2,), tensors[name].dtype)
        else:
            del tensors[name]
        path.write_bytes(ckpt.tensor_bytes(tensors))
    err = _resume_tiny_run_and_fail(out, capsys)
    assert needle in err, err


def test_a_frozen_text_encoder_keeps_its_weights_while_the_unet_learns(tmp_path):
    args = replace(TINY, max_train_steps=2)
    source = train_mod.make_source(args)
    start = train_mod.build_model(args, source, np.random.default_rng(args.seed))
    images, captions = source.batch(np.random.default_rng(1), 3)
    for frozen in (False, True):
        _, grads = train_mod.train_step(start, replace(args, freeze_text_encoder=frozen), start.config.schedule(),
                                        images, captions, np.random.default_rng(2))
        assert any(k.startswith("text.") for k in grads) is not frozen
    out = tmp_path / "frozen"
    train(replace(args, output_dir=str(out), freeze_text_encoder=True), progress=False)
    after = ckpt.load_tensors(out / "checkpoint-2" / ckpt.MODEL_FILE)
    changed = {k for k in after if not np.array_equal(after[k], start.params[k])}
    assert changed and all(k.startswith("unet.") for k in changed)


def test_resume_with_another_recipe_names_the_flags_to_pass(tmp_path, capsys):
    """Architecture and loss flags that differ from the checkpoint's are not silently dropped: the error
    names each with the stopped run's value, and flags that only steer the run may change."""
    out = tmp_path / "run"
    train(replace(TINY, output_dir=str(out), max_train_steps=2, snr_floor=0.25), progress=False)
    err = _resume_tiny_run_and_fail(out, capsys, "--base-channels", "16", "--checkpointing-steps", "1")
    assert "resume with --snr-floor 0.25 --base-channels 8 or start a new run" in err, err
    assert "checkpointing" not in err, err


def test_resume_with_the_other_text_encoder_setting_is_a_clear_error(tmp_path, capsys):
    out = tmp_path / "run"
    train(replace(TINY, output_dir=str(out), max_train_steps=2, freeze_text_encoder=True), progress=False)
    err = _resume_tiny_run_and_fail(out, capsys)
    assert "resume with --freeze-text-encoder" in err, err


def test_text_encoder_lr_scale_moves_only_the_text_encoder_less(tmp_path):
    """Three steps from the same start with the encoder at 1 and 0.1 x lr. The zero-initialized last
    layers of the residual and attention branches give the encoder no gradient before the third step,
    so both runs reach it with the same weights and gradients: the U-Net takes the same steps, and
    each text weight moves 0.1 times as far (the factor multiplies the whole AdamW step)."""
    args = replace(TINY, max_train_steps=3, checkpointing_steps=3, use_ema=False)
    start = train_mod.build_model(args, train_mod.make_source(args), np.random.default_rng(args.seed))
    moved = {}
    for scale in (1.0, 0.1):
        out = tmp_path / f"s{scale}"
        train(replace(args, output_dir=str(out), text_encoder_lr_scale=scale), progress=False)
        after = ckpt.load_tensors(out / "checkpoint-3" / ckpt.MODEL_FILE)
        moved[scale] = {k: after[k].astype(np.float64) - start.params[k] for k in after}
    for k, full in moved[1.0].items():
        expected = full * (0.1 if k.startswith("text.") else 1.0)
        # each move is a difference of float32 weights, so it is known to about one ulp of the weight
        # (1.2e-7 at |w| = 1, the scale of the embeddings)
        ulp = np.spacing(np.abs(start.params[k]).astype(np.float32)).astype(np.float64)
        bad = np.abs(moved[0.1][k] - expected) > 1e-3 * np.abs(expected) + 2 * ulp
        assert not bad.any(), (k, moved[0.1][k][bad][:5], expected[bad][:5])
    assert any(np.abs(v).max() > 0 for k, v in moved[0.1].items() if k.startswith("text."))


def test_resume_with_another_text_encoder_lr_scale_is_a_clear_error(tmp_path, capsys):
    out = tmp_path / "run"
    train(replace(TINY, output_dir=str(out), max_train_steps=2, text_encoder_lr_scale=0.1), progress=False)
    err = _resume_tiny_run_and_fail(out, capsys)
    assert "resume with --text-encoder-lr-scale 0.1" in err, err
