"""The GPU worker: a warm engine, a continuous-batching scheduler and the loop that feeds it from
the Redis job streams."""
