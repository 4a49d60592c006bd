// Package pageserver owns the target's page store of a live migration:
// the pages of every process of the migration by address, as the page
// stream delivers them, until the restore takes them.
//
// Store keeps, per process, blocks of 64 pages in a map (one entry per
// 256 KiB, not per page). A block's data pages sit in a buffer that grows
// with the pages it holds, so scattered pages do not cost whole blocks;
// zero pages are bits, never memory; gone pages are forgotten. Each write
// replaces what was stored (the latest round wins); a batch of an older
// round than the last applied is refused. Memory is drawn from a Budget
// shared by stores; when it refuses, blocks move to an unlinked spill file
// in a directory, or the batch is refused whole.
//
// The restore side reads a process's pages with Walk (extents in address
// order, data or zero) and can follow batches as they are applied with a
// hook (SetBatchHook), to write pages into a shadow process before the
// freeze.
//
// Service implements the Pages gRPC service on top: it checks each batch
// with pagestream.Decoder and applies it to the store of the migration the
// stream names, acknowledging every batch with totals, in order. Workers
// decompress and write several batches at once (writing fresh memory into
// a shadow process is the target's largest cost); batches are recorded in
// the store in stream order, and a batch waits for the earlier ones still
// being written whose address spans overlap it. A
// gRPC server built with GRPCServerOptions receives batch payloads without
// copying them out of gRPC's buffers.
package pageserver
