"""modelfleet: Kubernetes-native serving of language and embedding models behind an OpenAI-compatible API."""
