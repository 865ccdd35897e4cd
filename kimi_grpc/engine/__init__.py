"""Running the model: latent KV cache pools, sampling, generation."""
