"""Model components: encoder, projection, initializers, slot attention, predictor, decoder."""
