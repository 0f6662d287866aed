"""The hooks a plan installs, each inert until attached: gradient projection and the post-step weight projection,
their sharded (FSDP2 / DTensor) variants, and context projection of the text states."""
