// Package hotpath holds Go benchmarks (`go test -bench`) of the paths a
// migration spends its time in: reading a live process's pages
// (internal/pagereader), compressing them (pagestream's s2, zstd), storing
// them on the target (pageserver.Store), and writing them into the
// restored process (engine/ptrace.WriteMemory, into populated and into
// fresh pages). The package has no code of its own; README.md quotes its
// numbers.
//
//	go test -run '^$' -bench . -benchtime 2s ./bench/hotpath
package hotpath
