"""The Flax FID Inception equals pytorch-fid's on the same random weights, through the user's converter and loader;
its logits are the unbiased ones of the Inception Score; its two input protocols equal TF1's and PyTorch's resizes."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cmjax.metrics import inception

torch = pytest.importorskip("torch")
pytorch_fid_inception = pytest.importorskip("pytorch_fid.inception")


def pytorch_fid_network():
    """pytorch-fid's `fid_inception_v3()` body without the download: torchvision's Inception-v3 (1008 classes)
    with the FID blocks swapped in."""
    import torchvision

    m = pytorch_fid_inception
    net = torchvision.models.inception_v3(num_classes=1008, aux_logits=False, weights=None, init_weights=False)
    net.Mixed_5b = m.FIDInceptionA(192, pool_features=32)
    net.Mixed_5c = m.FIDInceptionA(256, pool_features=64)
    net.Mixed_5d = m.FIDInceptionA(288, pool_features=64)
    net.Mixed_6b = m.FIDInceptionC(768, channels_7x7=128)
    net.Mixed_6c = m.FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6d = m.FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6e = m.FIDInceptionC(768, channels_7x7=192)
    net.Mixed_7b = m.FIDInceptionE_1(1280)
    net.Mixed_7c = m.FIDInceptionE_2(2048)
    return net


def randomize(net, seed=0):
    """Random weights, with batch-norm running statistics and affine parameters far from their defaults."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in net.state_dict().items():
            if name.endswith("num_batches_tracked"):
                continue
            if name.endswith("running_var"):
                tensor.copy_(torch.rand(tensor.shape, generator=generator) * 1.5 + 0.25)
            elif name.endswith("running_mean"):
                tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.2)
            elif name.endswith("bn.weight"):
                tensor.copy_(torch.rand(tensor.shape, generator=generator) * 0.8 + 0.6)
            elif name.endswith("bn.bias"):
                tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.1 + 0.05)
            elif name.startswith("fc."):  # logits of the scale the real network gives (|l| ~ 10)
                tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.02)
            else:  # conv weights, scaled to keep activations O(1) through the depth
                fan_in = tensor[0].numel()
                tensor.copy_(torch.randn(tensor.shape, generator=generator) * (1.2 / fan_in) ** 0.5)
    return net.eval()


@pytest.fixture(scope="module")
def torch_net():
    return randomize(pytorch_fid_network())


@pytest.fixture(scope="module")
def weights_file(torch_net, tmp_path_factory):
    """The user's path: state dict → converter → .npz (torch.save'd file through convert_file)."""
    pth = str(tmp_path_factory.mktemp("inception") / "random_inception.pth")
    torch.save(torch_net.state_dict(), pth)
    return inception.convert_file(pth, pth.replace(".pth", ".npz"), check_hash=False)


def pytorch_fid_outputs(net, images_nchw):
    """pytorch-fid `InceptionV3(output_blocks=[3])` forward (resize 299, 2x-1) plus the IS logits: pool3 @ Wᵀ
    without the fc bias (the ADM evaluator's `softmax/logits/MatMul`, its torch port's `linear(x, weight)`)."""
    wrapper = pytorch_fid_inception.InceptionV3.__new__(pytorch_fid_inception.InceptionV3)
    torch.nn.Module.__init__(wrapper)
    # InceptionV3.__init__ builds the blocks from fid_inception_v3() (a download); build them from `net` instead.
    wrapper.resize_input, wrapper.normalize_input = True, True
    wrapper.output_blocks, wrapper.last_needed_block = [3], 3
    wrapper.blocks = torch.nn.ModuleList([
        torch.nn.Sequential(net.Conv2d_1a_3x3, net.Conv2d_2a_3x3, net.Conv2d_2b_3x3,
                            torch.nn.MaxPool2d(kernel_size=3, stride=2)),
        torch.nn.Sequential(net.Conv2d_3b_1x1, net.Conv2d_4a_3x3, torch.nn.MaxPool2d(kernel_size=3, stride=2)),
        torch.nn.Sequential(net.Mixed_5b, net.Mixed_5c, net.Mixed_5d, net.Mixed_6a, net.Mixed_6b, net.Mixed_6c,
                            net.Mixed_6d, net.Mixed_6e),
        torch.nn.Sequential(net.Mixed_7a, net.Mixed_7b, net.Mixed_7c, torch.nn.AdaptiveAvgPool2d((1, 1))),
    ])
    with torch.no_grad():
        pool = wrapper(torch.from_numpy(images_nchw))[0].flatten(1)
        logits = pool @ net.fc.weight.T
    return pool.numpy(), logits.numpy()


def test_flax_inception_equals_pytorch_fid(torch_net, weights_file):
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 1, size=(2, 3, 32, 32)).astype(np.float32)  # CIFAR-sized, resized to 299 by both
    images[1] = np.round(images[1] * 255) / 255  # a uint8-valued image too
    pool_ref, logits_ref = pytorch_fid_outputs(torch_net, images)

    variables = inception.load_variables(weights_file)
    with jax.default_matmul_precision("highest"):
        out = jax.jit(inception.FIDInception().apply)(variables, jnp.asarray(images.transpose(0, 2, 3, 1)))
    pool, logits = np.asarray(out["pool"]), np.asarray(out["logits"])
    assert pool.shape == (2, 2048) and logits.shape == (2, 1008)
    assert np.std(pool_ref) > 0.05 and np.std(logits_ref) > 0.05  # random weights that do not wash out
    assert float(torch_net.fc.bias.detach().abs().max()) > 0.01  # a bias that would show if it were added
    pool_diff, logits_diff = np.abs(pool - pool_ref).max(), np.abs(logits - logits_ref).max()
    print(f"max |pool diff| {pool_diff:.2e} (pool scale {np.abs(pool_ref).max():.2f}); "
          f"max |logit diff| {logits_diff:.2e} (scale {np.abs(logits_ref).max():.2f})")
    np.testing.assert_allclose(pool, pool_ref, atol=1e-4, rtol=0)
    np.testing.assert_allclose(logits, logits_ref, atol=1e-4, rtol=0)


def test_resize_matches_torch_bilinear():
    rng = np.random.default_rng(1)
    x = rng.uniform(0, 1, size=(1, 3, 8, 11)).astype(np.float32)
    expected = torch.nn.functional.interpolate(torch.from_numpy(x), size=(299, 299), mode="bilinear",
                                               align_corners=False).numpy()
    got = np.asarray(inception.preprocess(x.transpose(0, 2, 3, 1)))
    np.testing.assert_allclose((got + 1) / 2, expected.transpose(0, 2, 3, 1), atol=1e-6)
    # Downsizing too (no antialiasing, as pytorch-fid); source coordinates near 256 differ by float32 rounding
    # in PyTorch's kernel (one ulp there is 3e-5), hence the looser tolerance.
    big = rng.uniform(0, 1, size=(1, 3, 320, 310)).astype(np.float32)
    expected = torch.nn.functional.interpolate(torch.from_numpy(big), size=(299, 299), mode="bilinear",
                                               align_corners=False).numpy()
    np.testing.assert_allclose((np.asarray(inception.preprocess(big.transpose(0, 2, 3, 1))) + 1) / 2,
                               expected.transpose(0, 2, 3, 1), atol=1e-4)


def test_missing_or_wrong_weights_give_clear_errors(tmp_path):
    missing = str(tmp_path / "nope.npz")
    with pytest.raises(FileNotFoundError, match="python -m cmjax.metrics.inception"):
        inception.load_variables(missing)
    wrong = str(tmp_path / "wrong.npz")
    np.savez(wrong, **{"params/fc/kernel": np.zeros((3, 3), np.float32)})
    with pytest.raises(ValueError, match="not a converted FID Inception"):
        inception.load_variables(wrong)
    pth = str(tmp_path / "not_inception.pth")
    torch.save({"x": torch.zeros(1)}, pth)
    with pytest.raises(ValueError, match=inception.WEIGHTS_SHA256_PREFIX):
        inception.convert_file(pth, str(tmp_path / "x.npz"))


def test_official_weights_location_is_kept():
    assert inception.WEIGHTS_URL == pytorch_fid_inception.FID_WEIGHTS_URL
    assert inception.WEIGHTS_URL.endswith(f"-{inception.WEIGHTS_SHA256_PREFIX}.pth")
    assert os.path.basename(inception.DEFAULT_WEIGHTS).startswith("pt_inception-2015-12-05")


def test_inception_score_uses_the_logits_without_bias():
    """IS = exp E KL(p(y|x) ‖ p(y)) with p = softmax(pool3 @ W), no bias (ADM evaluator
    evaluations/evaluator.py:185-202,627-638; ECT metrics/inception_score.py:18-36, 10 equal splits), computed
    here in numpy from the same features and weights as the network's logits head."""
    from cmjax.metrics import fid

    rng = np.random.default_rng(3)
    pool = np.abs(rng.normal(size=(1000, inception.FEATURE_DIM))).astype(np.float32)  # pool3 is post-ReLU
    kernel = (rng.normal(size=(inception.FEATURE_DIM, inception.NUM_LOGITS)) * 0.05).astype(np.float32)
    bias = (rng.normal(size=inception.NUM_LOGITS) * 2.0).astype(np.float32)
    with jax.default_matmul_precision("highest"):
        logits = np.asarray(inception.UnbiasedLogits().apply({"params": {"kernel": kernel, "bias": bias}}, pool))

    def numpy_is(z):
        z = z.astype(np.float64)
        p = np.exp(z - z.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        scores = [np.exp(np.mean(np.sum(part * (np.log(part) - np.log(part.mean(0))), axis=1)))
                  for part in np.split(p, 10)]
        return np.mean(scores), np.std(scores)

    expected = numpy_is(pool.astype(np.float64) @ kernel.astype(np.float64))
    assert fid.inception_score(logits) == pytest.approx(expected, rel=1e-5)
    with_bias = numpy_is(pool.astype(np.float64) @ kernel + bias)
    assert abs(with_bias[0] - expected[0]) > 0.05 * expected[0]  # the bias would change the score


def test_tf_legacy_resize_equals_tf1_resize_bilinear():
    """The "tf_legacy" protocol is the 2015 graph's own ResizeBilinear (TF1: align_corners=False,
    half_pixel_centers=False) and (x − 128)/128, as the ADM evaluator and clean-fid legacy_tensorflow feed it."""
    tf = pytest.importorskip("tensorflow")
    rng = np.random.default_rng(4)
    for shape in ((2, 32, 32, 3), (1, 8, 11, 3), (1, 320, 310, 3)):  # CIFAR, odd sizes, downsizing
        uint8 = rng.integers(0, 256, size=shape).astype(np.float32)
        expected = tf.compat.v1.image.resize_bilinear(uint8, [299, 299], align_corners=False,
                                                      half_pixel_centers=False).numpy()
        got = np.asarray(inception.preprocess(uint8 / 255.0, protocol="tf_legacy"))
        np.testing.assert_allclose(got * 128.0 + 128.0, expected, atol=2e-4)  # pixel units (0–255)
        half_pixel = np.asarray(inception.preprocess(uint8 / 255.0, protocol="pytorch_fid")) * 127.5 + 127.5
        assert np.abs(half_pixel - expected).max() > 1.0  # the half-pixel resize is another protocol
    # At 299 no resize: uint8 v → (v − 128)/128 (the graph's Sub and Mul), not pytorch-fid's (v − 127.5)/127.5.
    values = np.arange(256, dtype=np.float32)
    image = np.broadcast_to(np.resize(values, 299 * 299).reshape(1, 299, 299, 1), (1, 299, 299, 3))
    np.testing.assert_allclose(np.asarray(inception.preprocess(image / 255.0, protocol="tf_legacy"))[0, 0, :256, 0],
                               (values - 128.0) / 128.0, atol=1e-6)
    with pytest.raises(ValueError, match="fid_protocol"):
        inception.preprocess(image, protocol="clean")
