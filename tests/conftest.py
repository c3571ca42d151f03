import os

# The suite checks values computed by hand in float32 on the CPU, where trainers would otherwise pick a
# GPU and bf16 by themselves; tests/gpu holds the GPU checks: `POSTTRAIN_TEST_GPU=1 pytest tests/gpu`.
if os.environ.get("POSTTRAIN_TEST_GPU") != "1":
    os.environ["CUDA_VISIBLE_DEVICES"] = ""

import pytest  # noqa: E402
import torch  # noqa: E402

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

# tiny models gain nothing from a second thread, and OpenMP threads spinning against each other
# on a busy 2-core machine slow small matrix products down by orders of magnitude
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed_and_cwd(tmp_path, monkeypatch):
    # tests never write into the checkout: default output dirs land in a temporary folder
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    yield


def _perturb_parameters(model, scale=0.05, seed=1):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * scale)
    return model


@pytest.fixture
def perturb():
    """``perturb(model, scale=0.05, seed=1)``: seeded noise added to every parameter in place (and the model
    returned), for a policy that differs from its reference, whose log-ratios are then far from 0."""
    return _perturb_parameters


@pytest.fixture(scope="session")
def tiny_model_dir():
    """Directory of the project's tiny random Qwen2 and its tokenizer (created once, cached)."""
    from posttrain.models.tiny import tiny_model_path

    return tiny_model_path(arch="qwen2", size="tiny")


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)
