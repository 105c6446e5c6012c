// A replacement for jacobsa/fuse's internal/buffer/runtime.go, laid over it
// with `go build -overlay` by scripts/build_fuse_examples.sh.
//
// Debian 12's golang-github-jacobsa-fuse-dev is a 2015 snapshot whose
// runtime.s jumps to runtime.memclr, which Go 1.8 renamed to
// memclrNoHeapPointers; since Go 1.17 an assembly jump into the runtime's
// Go functions does not link either. Linking to the same two runtime
// functions by name keeps the library's behaviour and changes nothing else.

package buffer

import "unsafe"

// Zero the n bytes starting at p.
//
//go:noescape
//go:linkname memclr runtime.memclrNoHeapPointers
func memclr(p unsafe.Pointer, n uintptr)

// Copy from src to dst, allowing overlap.
//
//go:noescape
//go:linkname memmove runtime.memmove
func memmove(dst unsafe.Pointer, src unsafe.Pointer, n uintptr)
