"""The image handler's batched decode on a real TorchServe: CPU workers here, GPU workers (nvJPEG, CUDA graphs) on
a GPU host. Each archive records the device it was built for, so a worker on the other device would refuse it."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
from support.answers import assert_same_answers
from support.bodies import batched_test_images, corrupt_jpeg, jpeg_bytes, png_bytes
from support.handlers import image_handler_with, plain_answer
from support.http import post_body
from support.servers import start_server, stop_everything_from

from servekit.build.archive import BuildOptions, build_archive
from servekit.serve.client import ServeClient
from servekit.serve.deployments import register_verified

pytestmark = pytest.mark.server

# Answers of Pillow on the CPU: the same pixels on a CPU worker; nvJPEG's pixels on a GPU worker (see
# tests/unit/test_gpu_cuda.py for the measured pixel differences).
DEVICES = {
    "cpu": {"worker": {"deviceType": "cpu"}, "handler": {}, "tolerance": 1e-4},
    "cuda": {"worker": {"deviceType": "gpu"}, "handler": {"cuda_graphs": [1, 2, 4, 8]}, "tolerance": 0.05},
}


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_served_batched_decode_answers_like_pillow_in_process(
    device, trained_image, all_models_store, held_out, tmp_path
):
    settings = DEVICES[device]
    store = tmp_path / "store"
    options = BuildOptions(
        batch_size=8,
        max_batch_delay_ms=20,
        handler={"image_decode": "batched", "device": device, **settings["handler"]},
        model_config=settings["worker"],
    )
    build_archive("image", "1.0.0", trained_image, store, handler="image", options=options)
    images = batched_test_images(held_out, 6)
    jpegs = [jpeg_bytes(image) for image in images]
    bodies = [(jpegs[i % len(jpegs)], "image/jpeg") for i in range(40)]
    bodies[7] = (corrupt_jpeg(jpegs[1]), "image/jpeg")
    bodies[21] = (png_bytes(images[2]), "image/png")
    pil = image_handler_with(all_models_store, tmp_path / "pil", image_decode="pil")
    expected_by_body = {body: plain_answer(pil, body, content_type) for body, content_type in bodies}
    workdir = tmp_path / "ts"
    state = start_server(store, workdir)
    try:
        client = ServeClient(state.endpoints())
        register_verified(client, store, "image", "1.0.0")
        with ThreadPoolExecutor(8) as pool:
            responses = list(pool.map(lambda b: post_body(client, "/predictions/image", *b), bodies))
    finally:
        stop_everything_from(workdir)
    statuses = [response.status_code for response in responses]
    assert statuses == [400 if i == 7 else 200 for i in range(len(bodies))]
    assert responses[7].json()["error"] == "invalid_image"
    good = [i for i in range(len(bodies)) if i != 7]
    assert_same_answers(
        [responses[i].json() for i in good], [expected_by_body[bodies[i][0]] for i in good], settings["tolerance"]
    )
