// Package source drives a live migration from the source host: pre-copy
// rounds while the process runs, the stop decision, the freeze and final
// state, and the commit or rollback that guarantees exactly one running
// copy of the process.
package source
