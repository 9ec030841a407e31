"""Operations tooling: the opt-in request log and the `tokenmill cache-report` simulator."""
