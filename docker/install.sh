#!/bin/sh
# Install ibau into the active Python environment exactly as the Docker image does.
#   docker/install.sh cpu  SRC    CPU build of torch and onnxruntime
#   docker/install.sh cuda SRC    CUDA build of torch (PyPI wheels bundle the CUDA libraries) and onnxruntime-gpu
# TORCH_VERSION and ORT_GPU_VERSION pin the builds; TORCH_INDEX_URL (optional) is where the CPU torch
# wheel comes from (the image uses https://download.pytorch.org/whl/cpu; a local mirror works too).
set -eu
variant=${1:?usage: install.sh cpu|cuda SRC}
src=${2:-.}
torch_version=${TORCH_VERSION:-2.13.0}
ort_gpu_version=${ORT_GPU_VERSION:-1.31.1}

case "$variant" in
  cpu)
    pip install ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} ${TORCH_INDEX_URL:+--extra-index-url https://pypi.org/simple} "torch==$torch_version"
    pip install "$src"
    ;;
  cuda)
    pip install "torch==$torch_version"
    pip install "$src"
    # onnxruntime and onnxruntime-gpu provide the same module: swap the CPU one for the CUDA one
    pip uninstall -y onnxruntime
    pip install "onnxruntime-gpu==$ort_gpu_version"
    ;;
  *)
    echo "install.sh: variant must be cpu or cuda, not '$variant'" >&2
    exit 2
    ;;
esac
python -c "import ibau_cli, torch, onnxruntime; print('ibau', ibau_cli.__version__, 'torch', torch.__version__, 'onnxruntime', onnxruntime.__version__, onnxruntime.get_available_providers())"
