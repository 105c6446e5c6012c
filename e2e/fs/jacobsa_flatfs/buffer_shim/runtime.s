// Empty on purpose: replaces jacobsa/fuse's internal/buffer/runtime.s (see
// runtime.go). An assembly file in the package lets runtime.go declare
// functions without bodies.
