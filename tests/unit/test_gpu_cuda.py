"""The GPU serving path on a real CUDA device: batched nvJPEG decode, CUDA graphs, channels_last. Every test here
carries the `gpu` marker: on a machine without CUDA they are deselected (and counted), never skipped silently."""

from __future__ import annotations

import pytest
import torch
from support.answers import assert_same_answers
from support.bodies import batched_test_images, corrupt_jpeg, jpeg_bytes, png_bytes, rotated_rgb_jpeg
from support.handlers import answer_batch, image_handler_with

pytestmark = pytest.mark.gpu

# nvJPEG (GPU) and libjpeg (CPU) decode the same JPEG a little differently: measured on an H100 (500x375 photos,
# ImageNet normalisation), max 0.23 and mean 0.0085 per pixel in normalised units; resizing on the GPU adds at most
# one uint8 level (0.02).
PIXEL_MAX_DIFFERENCE = 0.3
PIXEL_MEAN_DIFFERENCE = 0.02
# ... which moves the top-k probabilities of the test model by less than this:
DECODE_PROBABILITY_TOLERANCE = 0.05
# float16 eager and float16 CUDA graphs (padded batches may pick other kernels); float32 with TF32 convolutions.
FP16_PROBABILITY_TOLERANCE = 1e-2
FP32_PROBABILITY_TOLERANCE = 2e-3


@pytest.fixture
def cpu_pil(all_models_store, tmp_path):
    return image_handler_with(all_models_store, tmp_path / "cpu", image_decode="pil")


def test_batched_decode_on_cuda_answers_like_pillow_on_the_cpu(all_models_store, tmp_path, cpu_pil, held_out):
    gpu = image_handler_with(all_models_store, tmp_path / "gpu", gpu_id=0)  # image_decode auto: batched on CUDA
    assert gpu.device == torch.device("cuda:0") and gpu.batched_decode
    images = batched_test_images(held_out, 6)
    jpegs = [jpeg_bytes(image) for image in images]
    finished = gpu.finish_decoding([gpu.decode_request(jpeg, "image/jpeg") for jpeg in jpegs])
    pairs = zip(finished, jpegs, strict=True)
    differences = torch.stack([(request.samples[0].cpu() - cpu_pil.to_sample(jpeg)).abs() for request, jpeg in pairs])
    assert all(request.samples[0].device.type == "cuda" for request in finished)
    assert differences.max() <= PIXEL_MAX_DIFFERENCE and differences.mean() <= PIXEL_MEAN_DIFFERENCE
    bodies = [
        *[(jpeg, "image/jpeg") for jpeg in jpegs],
        (png_bytes(images[0]), "image/png"),  # Pillow on the CPU, pinned copy, transform on the GPU
        (rotated_rgb_jpeg(images[1]), "image/jpeg"),
        (jpeg_bytes(images[2].convert("L")), "image/jpeg"),
    ]
    expected, _ = answer_batch(cpu_pil, bodies)
    answers, statuses = answer_batch(gpu, bodies)
    assert statuses == {}
    assert_same_answers(answers, expected, DECODE_PROBABILITY_TOLERANCE)


def test_a_corrupt_jpeg_in_a_cuda_batch_answers_400_alone(all_models_store, tmp_path, cpu_pil, held_out):
    gpu = image_handler_with(all_models_store, tmp_path / "gpu", gpu_id=0, image_decode="batched")
    jpegs = [jpeg_bytes(image) for image in batched_test_images(held_out, 3)]
    bodies = [(jpegs[0], "image/jpeg"), (corrupt_jpeg(jpegs[1]), "image/jpeg"), (jpegs[2], "image/jpeg")]
    answers, statuses = answer_batch(gpu, bodies)
    assert list(statuses) == [1] and statuses[1][0] == 400 and answers[1]["error"] == "invalid_image"
    expected, _ = answer_batch(cpu_pil, bodies)
    assert_same_answers([answers[0], answers[2]], [expected[0], expected[2]], DECODE_PROBABILITY_TOLERANCE)


def test_cuda_graphs_answer_like_the_eager_model_in_float16(all_models_store, tmp_path, held_out):
    eager = image_handler_with(all_models_store, tmp_path / "eager", gpu_id=0, dtype="float16")
    graphed = image_handler_with(
        all_models_store,
        tmp_path / "graphs",
        gpu_id=0,
        dtype="float16",
        device="cuda",
        cuda_graphs=[1, 2, 4, 8],
        warmup=1,
    )
    assert graphed.graphs is not None and sorted(graphed.graphs.runners) == [1, 2, 4, 8]
    jpegs = [jpeg_bytes(image) for image in batched_test_images(held_out, 6)]
    for count in (1, 3, 8, 11):  # padded to 1, 4 and 8; 11 runs as 8 + 3 padded to 4
        bodies = [(jpegs[i % len(jpegs)], "image/jpeg") for i in range(count)]
        expected, _ = answer_batch(eager, bodies)
        answers, statuses = answer_batch(graphed, bodies)
        assert statuses == {}
        assert_same_answers(answers, expected, FP16_PROBABILITY_TOLERANCE)
    replays = []
    runner = graphed.graphs.runners[4]
    replay = runner.replay
    runner.replay = lambda: replays.append(4) or replay()
    answer_batch(graphed, [(jpegs[0], "image/jpeg")] * 3)
    assert replays == [4]  # served by the captured graph, not the eager fallback


def test_channels_last_answers_like_the_contiguous_model(all_models_store, tmp_path, held_out):
    contiguous = image_handler_with(all_models_store, tmp_path / "nchw", gpu_id=0, channels_last=False)
    nhwc = image_handler_with(all_models_store, tmp_path / "nhwc", gpu_id=0)
    weight = next(p for p in nhwc.model.parameters() if p.dim() == 4)
    assert nhwc.channels_last and weight.is_contiguous(memory_format=torch.channels_last)
    bodies = [(jpeg_bytes(image), "image/jpeg") for image in batched_test_images(held_out, 6)]
    expected, _ = answer_batch(contiguous, bodies)
    answers, statuses = answer_batch(nhwc, bodies)
    assert statuses == {}
    assert_same_answers(answers, expected, FP32_PROBABILITY_TOLERANCE)
