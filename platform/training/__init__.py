"""Ray Train loops for the vertical models, and the experiment over arms and seeds."""
