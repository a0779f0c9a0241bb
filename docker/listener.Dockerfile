# thighseg DICOM listener image: slim Python, non-root, no torch, spool on a volume.
#   docker build -f docker/listener.Dockerfile -t thighseg/listener:0.1.0 .
# Run with a read-only root filesystem: everything it writes goes to /var/lib/thighseg and /tmp.
FROM python:3.11-slim-bookworm
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
WORKDIR /opt/thighseg
COPY pyproject.toml README.md ./
COPY thighseg thighseg
COPY client client
COPY export export
COPY dicom_listener dicom_listener
RUN pip install . \
    && useradd --uid 10001 --no-create-home --shell /usr/sbin/nologin thighseg \
    && mkdir -p /var/lib/thighseg && chown 10001 /var/lib/thighseg
USER 10001
VOLUME ["/var/lib/thighseg"]
EXPOSE 11112 9108
HEALTHCHECK --interval=30s --timeout=5s CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9108/metrics', timeout=3)"]
ENTRYPOINT ["thighseg", "listen", "--spool", "/var/lib/thighseg/spool", "--out", "/var/lib/thighseg/results"]
CMD ["--triton-url", "triton:8000", "--triton-wait", "600"]
