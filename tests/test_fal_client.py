"""The stock `fal-client` package, unmodified, runs fal-ai/lora against our server over TLS.

fal-client reads its host from FAL_RUN_HOST at import and trusts the CA bundle in SSL_CERT_FILE,
so each scenario runs in a fresh interpreter with that environment, exactly as a user would.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from tests.conftest import TEST_KEY

pytestmark = pytest.mark.slow


def run_client(stack: str, test_ca, script: str) -> dict:
    env = dict(
        os.environ,
        FAL_RUN_HOST=stack.removeprefix("https://"),
        FAL_QUEUE_RUN_HOST=stack.removeprefix("https://") + "/queue",
        FAL_KEY=TEST_KEY,
        SSL_CERT_FILE=str(test_ca.ca_file),
    )
    completed = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)], env=env, capture_output=True, text=True, timeout=180
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    return json.loads(completed.stdout.strip().splitlines()[-1])


def test_fal_client_run_gets_images(stack, test_ca):
    out = run_client(
        stack,
        test_ca,
        """
        import json, fal_client
        result = fal_client.run("fal-ai/lora", arguments={
            "model_name": "stabilityai/stable-diffusion-xl-base-1.0",
            "prompt": "Photo of a classic red mustang car parked in las vegas strip at night",
            "image_size": {"width": 128, "height": 96}, "num_inference_steps": 4, "seed": 5,
        })
        print(json.dumps(result))
        """,
    )
    (image,) = out["images"]
    assert (image["width"], image["height"]) == (128, 96)
    assert image["url"].startswith("https://localhost:") and out["seed"] == 5


def test_fal_client_image_to_image_with_an_encoded_image(stack, test_ca):
    out = run_client(
        stack,
        test_ca,
        """
        import json, fal_client
        from PIL import Image
        image = Image.new("RGB", (80, 64), (200, 30, 30))
        result = fal_client.run("fal-ai/lora/image-to-image", arguments={
            "model_name": "runwayml/stable-diffusion-v1-5", "prompt": "a red square",
            "image_url": fal_client.encode_image(image), "noise_strength": 0.6,
            "num_inference_steps": 5, "sync_mode": True,
        })
        print(json.dumps({"size": [result["images"][0]["width"], result["images"][0]["height"]],
                          "data_uri": result["images"][0]["url"].startswith("data:image/png;base64,")}))
        """,
    )
    assert out == {"size": [80, 64], "data_uri": True}


def test_fal_client_sees_validation_errors(stack, test_ca):
    out = run_client(
        stack,
        test_ca,
        """
        import json, fal_client
        try:
            fal_client.run("fal-ai/lora", arguments={"model_name": "runwayml/stable-diffusion-v1-5",
                                                      "prompt": "x", "num_images": 99})
            print(json.dumps({"raised": False}))
        except Exception as exc:
            print(json.dumps({"raised": True, "type": type(exc).__name__, "status": getattr(exc, "status_code", None),
                              "text": str(exc)}))
        """,
    )
    assert out["raised"] and out["status"] == 422, out
    assert "num_images" in out["text"]
