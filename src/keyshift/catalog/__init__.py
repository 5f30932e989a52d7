"""The catalog: editions and plans as manifests, published as immutable versions."""
