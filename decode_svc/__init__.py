"""The decode server: a gRPC service around an engine in consumer role (or colocated).

It pulls a request's prompt KV through its connector (the request waits outside the batch),
then decodes in continuous batches and streams tokens back. Without ``kv_transfer_params`` it
computes the prompt itself: that is the colocated baseline and the proxy's fallback. Imports
engine, kv_connector and protos; never proxy or prefill_svc.
"""
