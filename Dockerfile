# One image for every kvfabric service; the command picks the role.
FROM python:3.11-slim
WORKDIR /opt/kvfabric
COPY . .
RUN bash scripts/setup
ENV PATH=/opt/kvfabric/.venv/bin:$PATH
# Convert the bundled model at build time so containers start without the 20 s conversion.
RUN python -c "from engine.models import resolve_model_path; resolve_model_path(None)"
ENTRYPOINT ["kvfabric"]
