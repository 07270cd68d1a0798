# ldm-scene app image: the Gradio app with the embedded toy model, CPU only, offline.
# Runs as uid 1000 on port 7860, as Hugging Face Docker Spaces expect.
#
#   docker build -t ldm-scene .
#   docker run --rm -p 7860:7860 ldm-scene            # then open http://localhost:7860
#
# GPU variant (SD v1.4 from the Hub; needs the NVIDIA driver and nvidia-container-toolkit on the host):
#
#   docker build -t ldm-scene:gpu --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu126 .
#   docker run --rm --gpus all -p 7860:7860 -e HF_HUB_OFFLINE=0 -e LDM_SCENE_MODEL=sd14 \
#       -e LDM_SCENE_PROBES=/home/user/app/weights/sd14/probes \
#       -v $HOME/.cache/huggingface:/home/user/.cache/huggingface ldm-scene:gpu
#
# The CUDA wheels of torch bring their own CUDA runtime, so the same slim base works for both.
# SD v1.4's weights (~4 GB, licence accepted on the Hub) are downloaded on first start unless the
# mounted cache holds them; VGG-16 for the Classifier tab likewise (torch hub cache).
FROM python:3.11-slim

ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    GRADIO_ANALYTICS_ENABLED=False \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    MPLCONFIGDIR=/tmp/matplotlib \
    LDM_SCENE_MODEL=toy \
    HOST=0.0.0.0 \
    PORT=7860

RUN useradd --create-home --uid 1000 user
WORKDIR /home/user/app

# torch and torchvision from the chosen index first (CPU wheels are ~10x smaller than the CUDA
# ones), then everything else from PyPI; the pins in requirements.txt still hold (2.14.1+cpu == 2.14.1).
COPY --chown=user requirements.txt ./
RUN grep -E '^(torch|torchvision)==' requirements.txt > /tmp/torch.txt \
    && pip install --index-url "$TORCH_INDEX" -r /tmp/torch.txt \
    && pip install -r requirements.txt \
    && rm /tmp/torch.txt

COPY --chown=user ldm_scene ./ldm_scene
COPY --chown=user examples ./examples
COPY --chown=user weights ./weights
COPY --chown=user app.py ./

USER 1000
EXPOSE 7860
CMD ["python", "app.py", "--host", "0.0.0.0", "--port", "7860"]
