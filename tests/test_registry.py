"""The registered sampler's device (a GPU stands in as the meta device)."""

from types import SimpleNamespace

from aot_model import devices
from aot_model.checkpoints import find_checkpoints
from aot_pipeline.registry import Sampler


def test_the_sampler_loads_onto_the_device_auto_picks(finished_run, monkeypatch):
    asked = []
    monkeypatch.setattr(
        devices, "resolve", lambda device, name: asked.append((device, name)) or ("meta", "GPU")
    )
    sampler = Sampler()
    checkpoint = str(find_checkpoints(finished_run)[-1])
    sampler.load_context(SimpleNamespace(artifacts={"checkpoint": checkpoint}))
    assert asked == [("auto", "the sampler's device")]
    assert sampler.device == "meta"
    assert {p.device.type for p in sampler.net.parameters()} == {"meta"}
