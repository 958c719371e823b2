"""Weight transports: object_store on CPU under Ray, the nccl transport's bucketing over gloo (threads),
layout checks; cuda_ipc and real nccl on GPU."""
import threading

import pytest
import torch

from common.model import build_model, preset_config
from common.weights import bucketize, flat_layout, model_layout, resolve_transport
from learner.weight_sync import NcclSender, ObjectStoreSender
from rollout.weight_sync import NcclReceiver, ObjectStoreReceiver


def tiny(seed: int):
    return build_model(preset_config("tiny"), seed=seed)


def assert_equal_models(a, b):
    sb = b.state_dict()
    for name, tensor in a.state_dict().items():
        assert torch.equal(tensor.cpu(), sb[name].cpu()), name


def test_layout_is_aligned_and_buckets_cover_it():
    layout, total = model_layout(tiny(0))
    assert all(m.offset % 256 == 0 for m in layout) and total >= sum(m.nbytes for m in layout)
    buckets = bucketize(layout, bucket_bytes=100_000)
    assert [m.name for b in buckets for m in b.metas] == [m.name for m in layout]
    assert all(b.nbytes <= 100_000 or len(b.metas) == 1 for b in buckets)
    assert len(buckets) > 3


def test_resolve_transport():
    assert resolve_transport("auto", learner_gpus=0, rollout_gpus=0) == "object_store"
    assert resolve_transport("cuda_ipc", learner_gpus=1, rollout_gpus=0.5) == "cuda_ipc"
    assert resolve_transport("auto", learner_gpus=1, rollout_gpus=1) == "nccl"
    with pytest.raises(ValueError, match="choose"):
        resolve_transport("carrier_pigeon", learner_gpus=0, rollout_gpus=0)


@pytest.mark.ray
def test_object_store_roundtrip_and_versions(ray_local):
    source, target = tiny(0), tiny(1)
    sender, receiver = ObjectStoreSender(), ObjectStoreReceiver()
    update = sender.send(source.state_dict().items(), version=3)
    assert receiver.receive(target, update) == 3
    assert_equal_models(source, target)
    assert update.metrics["sync/gbytes"] > 0 and update.metrics["sync/seconds"] > 0
    with torch.no_grad():
        source.transformer.wte.weight.add_(1.0)
    assert receiver.receive(target, sender.send(source.state_dict().items(), version=4)) == 4
    assert_equal_models(source, target)


@pytest.mark.ray
def test_a_prefetched_update_is_copied_in_and_any_other_is_left_to_the_receiver(ray_local):
    """The rollout actor's double buffer: filled with version 1 (beside a rollout), ``take`` of that update copies
    it in; ``take`` of an update it does not hold (another version, or the same version with another payload,
    as a rebuilt learner sends) changes nothing and says so; each fill is taken once."""
    from rollout.weight_sync import PrefetchBuffer

    sender, model = ObjectStoreSender(), build_model(preset_config("tiny"), seed=0)
    states = {s: build_model(preset_config("tiny"), seed=s).state_dict() for s in (1, 2)}
    u1 = sender.send(states[1].items(), version=1)
    resent = sender.send(states[1].items(), version=1)  # same version, another object
    u2 = sender.send(states[2].items(), version=2)
    buffer = PrefetchBuffer()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    buffer.fill(model, u1)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # filling leaves the model alone
    assert not buffer.take(model, u2) and not buffer.take(model, resent)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert buffer.take(model, u1)
    assert all(torch.equal(v, states[1][k]) for k, v in model.state_dict().items())
    assert not buffer.take(model, u1)  # taken: a second set_weights of it receives it itself


@pytest.mark.ray
def test_layout_mismatch_is_one_clear_error(ray_local):
    source = tiny(0)
    other = build_model(preset_config("tiny", n_layers=3), seed=0)
    update = ObjectStoreSender().send(source.state_dict().items(), version=1)
    with pytest.raises(ValueError, match="weight layout mismatch"):
        ObjectStoreReceiver().receive(other, update)


def _broadcast(sender_model, receiver_models, version, port, bucket_bytes, backend="gloo", device="cpu"):
    """Run the nccl transport's code with one sender and N receivers as threads of this process."""
    world = len(receiver_models) + 1
    layout, total = flat_layout((n, tuple(t.shape), t.dtype) for n, t in sender_model.state_dict().items())
    results = {}

    def send():
        sender = NcclSender(host="127.0.0.1", port=port, world_size=world, layout=layout, total_bytes=total,
                            bucket_bytes=bucket_bytes, backend=backend, device=device)
        results["update"] = sender.send(sender_model.state_dict().items(), version)

    def receive(rank, model):
        receiver = NcclReceiver(host="127.0.0.1", port=port, rank=rank, world_size=world, bucket_bytes=bucket_bytes,
                                backend=backend, device=device)
        results[rank] = receiver.receive(model)

    threads = [threading.Thread(target=send)] + [
        threading.Thread(target=receive, args=(i + 1, m)) for i, m in enumerate(receiver_models)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    return results


def test_bucketed_broadcast_over_gloo_reaches_every_receiver():
    from learner.worker import free_port

    source, a, b = tiny(0), tiny(1), tiny(2)
    # Small buckets: many rounds through both buffers, and tensors larger than a bucket.
    results = _broadcast(source, [a, b], version=7, port=free_port(), bucket_bytes=40_000)
    assert results[1] == results[2] == 7
    assert results["update"].metrics["sync/gb_per_s"] > 0
    assert_equal_models(source, a)
    assert_equal_models(source, b)


@pytest.mark.gpu
def test_nccl_broadcast_between_two_gpus():
    from learner.worker import free_port

    if torch.cuda.device_count() < 2:
        pytest.skip("NCCL needs one GPU per rank")
    source = tiny(0).to("cuda:0")
    target = tiny(1).to("cuda:1")
    port = free_port()
    world = 2
    layout, total = flat_layout((n, tuple(t.shape), t.dtype) for n, t in source.state_dict().items())
    out = {}

    def send():
        torch.cuda.set_device(0)
        s = NcclSender(host="127.0.0.1", port=port, world_size=world, layout=layout, total_bytes=total,
                       bucket_bytes=100_000, backend="nccl", device="cuda:0")
        out["u"] = s.send(source.state_dict().items(), 5)

    def recv():
        torch.cuda.set_device(1)
        r = NcclReceiver(host="127.0.0.1", port=port, rank=1, world_size=world, bucket_bytes=100_000,
                         backend="nccl", device="cuda:1")
        out["v"] = r.receive(target)

    threads = [threading.Thread(target=send), threading.Thread(target=recv)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert out["v"] == 5
    assert_equal_models(source, target)


def _ipc_receiver(queue, done):
    from rollout.weight_sync import CudaIpcReceiver

    model = tiny(1).cuda()
    receiver = CudaIpcReceiver()
    for _ in range(2):
        update = queue.get()
        version = receiver.receive(model, update)
        done.put((version, {k: v.cpu() for k, v in model.state_dict().items()}, receiver._buffer_id))


@pytest.mark.gpu
def test_cuda_ipc_between_two_processes_reuses_the_handle():
    import torch.multiprocessing as mp

    from learner.weight_sync import CudaIpcSender

    ctx = mp.get_context("spawn")
    queue, done = ctx.Queue(), ctx.Queue()
    proc = ctx.Process(target=_ipc_receiver, args=(queue, done))
    proc.start()
    source, sender = tiny(0).cuda(), CudaIpcSender()
    ids = []
    for version in (1, 2):
        with torch.no_grad():
            source.transformer.wte.weight.add_(version)
        queue.put(sender.send(source.state_dict().items(), version))
        got, state, buffer_id = done.get(timeout=120)
        assert got == version
        ids.append(buffer_id)
        for name, tensor in source.state_dict().items():
            assert torch.equal(tensor.cpu(), state[name]), name
    assert ids[0] == ids[1]  # opened once, reused for the second version
    proc.join(timeout=60)
