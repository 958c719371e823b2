"""The masked-diffusion SFT loss: LLaDA's objective, deterministic preparation, micro-batch invariance, and the
EOS run trained whatever the tokenizer's pad id (LLaDA's pad == eos)."""
import torch
import torch.nn.functional as F

from common.model import build_model, preset_config
from common.trajectory import Trajectory
from learner.losses.base import select_rows
from learner.sft import MaskedDiffusionSFT

MASK, PAD, EOS = 3, 0, 2


def make_batch(B=6, P=5, G=9, seed=0) -> Trajectory:
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(5, 101, (B, P), generator=g)
    prompt_mask = torch.ones(B, P, dtype=torch.bool)
    prompt[0, :2], prompt_mask[0, :2] = PAD, False  # one left-padded prompt
    comp = torch.randint(5, 101, (B, G), generator=g)
    comp[1, -3:] = EOS  # one completion ending in an EOS run (trained: it is how the model learns to stop)
    zf, T = torch.zeros(B, G), 3
    return Trajectory(prompt, prompt_mask, comp, torch.zeros(B, G, dtype=torch.long), zf, zf, zf, zf,
                      torch.zeros(B, T), torch.zeros(B, T), torch.zeros(B, T, dtype=torch.long))


def tiny(seed=0):
    return build_model(preset_config("tiny"), seed=seed)


def test_prepare_is_deterministic_and_masks_only_completion_tokens():
    loss = MaskedDiffusionSFT(mask_id=MASK)
    batch = make_batch(B=64, G=32)
    a, b = loss.prepare(batch, seed=7), loss.prepare(batch, seed=7)
    assert torch.equal(a.extras["sft_masked_BG"], b.extras["sft_masked_BG"])
    assert torch.equal(a.extras["sft_t_B"], b.extras["sft_t_B"])
    assert not torch.equal(loss.prepare(batch, seed=8).extras["sft_masked_BG"], a.extras["sft_masked_BG"])
    masked, t = a.extras["sft_masked_BG"], a.extras["sft_t_B"]
    assert ((t >= 1e-3) & (t <= 1)).all()
    # The masked fraction tracks t (32 tokens per row): correlation across rows is strong.
    frac = masked.float().mean(1)
    assert torch.corrcoef(torch.stack([frac, t]))[0, 1] > 0.8


def test_loss_equals_llada_formula():
    torch.manual_seed(0)
    model, loss = tiny(), MaskedDiffusionSFT(mask_id=MASK)
    batch = loss.prepare(make_batch(), seed=3)
    metrics = loss.backward(model, batch, total_samples=len(batch))

    masked, t = batch.extras["sft_masked_BG"], batch.extras["sft_t_B"]
    noisy = torch.where(masked, MASK, batch.completion_ids_BG)
    ids = torch.cat([batch.prompt_ids_BP, noisy], 1)
    attn = torch.cat([batch.prompt_mask_BP, torch.ones_like(noisy, dtype=torch.bool)], 1)
    with torch.no_grad():
        logits = model(ids, attention_mask=attn).logits[:, batch.prompt_ids_BP.shape[1]:]
    ce = F.cross_entropy(logits.transpose(1, 2), batch.completion_ids_BG, reduction="none")
    length = batch.completion_ids_BG.shape[1]  # every completion position, the EOS run included
    expected = ((ce * masked / t[:, None]).sum(1) / length).mean()
    assert abs(metrics["loss"] - expected.item()) < 1e-5
    assert metrics["masked_tokens"] == masked.sum().item()


def test_prompt_is_never_masked_in_the_model_input():
    seen = {}

    class Spy(torch.nn.Module):
        logit_shift = 0  # wraps a LLaDA model

        def __init__(self, model):
            super().__init__()
            self.model = model

        def hidden_states(self, ids, mask, pos=None):
            seen["ids"] = ids
            return self.model.hidden_states(ids, mask, pos)

        def vocab_logits(self, h):
            return self.model.vocab_logits(h)

    loss = MaskedDiffusionSFT(mask_id=MASK)
    batch = loss.prepare(make_batch(), seed=0)
    loss.backward(Spy(tiny()), batch, total_samples=len(batch))
    P = batch.prompt_ids_BP.shape[1]
    assert torch.equal(seen["ids"][:, :P], batch.prompt_ids_BP)
    assert torch.equal(seen["ids"][:, P:] == MASK, batch.extras["sft_masked_BG"])


def test_gradients_identical_for_one_and_two_micro_batches():
    loss = MaskedDiffusionSFT(mask_id=MASK)
    batch = loss.prepare(make_batch(B=5), seed=1)
    one, two = tiny(), tiny()
    m1 = loss.backward(one, batch, total_samples=5)
    m2 = {}
    for rows in (slice(0, 2), slice(2, 5)):
        for k, v in loss.backward(two, select_rows(batch, rows), total_samples=5).items():
            m2[k] = m2.get(k, 0.0) + v
    assert abs(m1["loss"] - m2["loss"]) < 1e-6
    for (name, p1), p2 in zip(one.named_parameters(), two.parameters()):
        assert torch.allclose(p1.grad, p2.grad, atol=1e-7, rtol=1e-5), name


def test_infinite_total_samples_contributes_zero_gradient():
    # The learner replays a row with total_samples=inf on ranks that ran out of samples.
    loss = MaskedDiffusionSFT(mask_id=MASK)
    batch = loss.prepare(make_batch(B=2), seed=1)
    model = tiny()
    loss.backward(model, batch, total_samples=float("inf"))
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())


def test_sft_batch_keeps_whole_references_with_their_eos():
    """A reference that does not fit with its EOS is left out, never cut: cutting a 16-digit Sudoku grid to
    15 digits + EOS (what the first tiny Sudoku base was trained on) teaches an answer that is never whole."""
    import itertools

    import pytest

    from common.config import TaskConfig
    from common.tasks import get_task
    from common.tokenizers import CharTokenizer
    from driver.sft import sft_batch

    tok, task = CharTokenizer(), get_task(TaskConfig(name="sudoku"))
    items = list(itertools.islice(task.train_items(0), 4))
    batch, left_out = sft_batch(items, task, tok, gen_length=20)
    assert left_out == 0 and batch.completion_ids_BG.shape == (4, 20)
    for row, item in zip(batch.completion_ids_BG.tolist(), items):
        assert tok.decode(row[:16]) == item.answer and set(row[16:]) == {tok.eos_id}
    with pytest.raises(ValueError, match="raise sampler.gen_length"):
        sft_batch(items, task, tok, gen_length=16)
    mixed = get_task(TaskConfig(name="countdown"))
    cd_items = list(itertools.islice(mixed.train_items(0), 64))
    longest = max(len(mixed.reference_completion(it)) for it in cd_items)
    batch, left_out = sft_batch(cd_items, mixed, tok, gen_length=longest)  # the longest ones lack room for EOS
    assert 0 < left_out < 64 and len(batch) == 64 - left_out


def test_unmask_sft_refuses_a_gen_length_without_room_in_one_line(capsys, caplog):
    from driver.cli import main

    code = main(["sft", "--config", "sft_tiny_sudoku", "--set", "sampler.gen_length=16",
                 "--set", "sampler.block_length=8", "--set", "sampler.steps=16"])
    assert code == 2
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert errors == ["unmask: no reference completion in the batch fits sampler.gen_length=16 (the first needs "
                      "17 tokens with its EOS); raise sampler.gen_length"]


def test_a_tokenizer_with_pad_equal_to_eos_still_trains_the_eos_run():
    """LLaDA's tokenizer has pad == eos (126081): masking by token id would drop every EOS and the model would
    never learn to stop. Masking is by position, so the EOS run is masked and trained like any token."""
    import itertools

    from common.config import TaskConfig
    from common.tasks import get_task
    from common.tokenizers import CharTokenizer
    from driver.sft import sft_batch

    tok, task = CharTokenizer(), get_task(TaskConfig(name="sudoku"))
    tok.pad_id = tok.eos_id
    batch, _ = sft_batch(list(itertools.islice(task.train_items(0), 16)), task, tok, gen_length=24)
    eos_BG = batch.completion_ids_BG == tok.eos_id
    assert eos_BG[:, 16:].all()  # 16 answer digits, then the EOS run
    loss = MaskedDiffusionSFT(mask_id=tok.mask_id)
    prepared = loss.prepare(batch, seed=0)
    masked_BG = prepared.extras["sft_masked_BG"]
    # EOS positions are masked at the rate of the other positions (8 of 24 per row)
    assert abs(masked_BG[eos_BG].float().mean() - masked_BG[~eos_BG].float().mean()) < 0.15
    # Training only on the masked EOS positions: a positive loss with a gradient, and one SGD step on it
    # raises the model's EOS probability there.
    only_eos = prepared.select(slice(None))
    only_eos.extras = {**prepared.extras, "sft_masked_BG": masked_BG & eos_BG}
    model = build_model(preset_config("tiny", vocab_size=tok.vocab_size), seed=0)
    first = loss.backward(model, only_eos, total_samples=len(batch))
    assert first["masked_tokens"] == int((masked_BG & eos_BG).sum()) > 0 and first["loss"] > 0
    with torch.no_grad():
        for p in model.parameters():
            p -= 0.5 * p.grad
            p.grad = None
    assert loss.backward(model, only_eos, total_samples=len(batch))["loss"] < first["loss"]


def test_block_diffusion_sft_masks_one_block_on_clean_earlier_blocks_and_scales_by_the_blocks():
    """On the sequence grid (SDAR) each sample masks tokens of one block only (blocks counted from the
    prompt's first real token), and the loss counts that block x the number of blocks the completion spans;
    Dream's shifted logits are read a column early. Both checked against the formula written out here."""
    for preset, grid, K in (("tiny-sdar", "sequence", 4), ("tiny-dream", "completion", 0)):
        torch.manual_seed(0)
        model = build_model(preset_config(preset), seed=1)
        loss = MaskedDiffusionSFT(mask_id=MASK, position_ids="packed", block_grid=grid, block_length=K)
        batch = loss.prepare(make_batch(B=16, P=5, G=9), seed=4)
        masked, t, scale = (batch.extras[k] for k in ("sft_masked_BG", "sft_t_B", "sft_scale_B"))
        if grid == "sequence":
            offset = batch.prompt_mask_BP.sum(1) % K  # row 0 has 3 real prompt tokens, the others 5
            block = (torch.arange(9)[None, :] + offset[:, None]) // K
            assert torch.equal(scale, (block[:, -1] + 1).float())
            for b in range(16):
                assert len(set(block[b][masked[b]].tolist())) <= 1
            assert masked.any(1).float().mean() > 0.5
        else:
            assert torch.equal(scale, torch.ones(16))
        metrics = loss.backward(model, batch, total_samples=len(batch))
        noisy = torch.where(masked, MASK, batch.completion_ids_BG)
        ids = torch.cat([batch.prompt_ids_BP, noisy], 1)
        attn = torch.cat([batch.prompt_mask_BP, torch.ones_like(noisy, dtype=torch.bool)], 1)
        pos = (attn.long().cumsum(1) - 1).clamp(min=0)
        P, shift = batch.prompt_ids_BP.shape[1], model.logit_shift
        with torch.no_grad():
            logits = model(ids, attention_mask=attn, position_ids=pos).logits[:, P - shift:P - shift + 9]
        ce = F.cross_entropy(logits.transpose(1, 2), batch.completion_ids_BG, reduction="none")
        expected = ((ce * masked / t[:, None]).sum(1) * scale / 9).mean()
        assert abs(metrics["loss"] - expected.item()) < 1e-5
