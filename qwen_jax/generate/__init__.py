"""Generation: decode caches, jitted prefill and decode, sampling."""
