"""The learner side: policy-gradient losses (``learner.losses``), the FSDP2 learner group, optimizer,
checkpoints and weight sending."""
