// Package pagestream owns page batches on the wire: how the pages of a
// process travel from the source to the target of a live migration.
//
// A batch (migrationpb.PageBatch) holds runs of one process from one round,
// each of one kind: data pages, zero pages, or gone pages (the process no
// longer has them). Zero pages never travel as data: the source detects
// them and sends only their addresses. The data pages are concatenated
// and compressed with the stream's codec (S2 by default, zstd or none),
// or sent uncompressed when compression does not help; the payload as
// sent carries its CRC-32C.
//
// The source side is Sender, one per migration and page stream. Its Sink
// is what a pre-copy round writes to (the predump.Sink shape: WritePages,
// ZeroPages, KeepPages, Done): it batches the pages, finds the zero ones,
// compresses on several cores, streams the batches in order, and at Done
// sends as gone the pages the target holds that the round did not mention,
// then waits for the target's acknowledgement. Stats measure what went
// over the wire and how fast, for the stop rule.
//
// The target side is Decoder: it checks a batch against Limits, its
// sequence number, codec, lengths and checksum, decompresses into a pooled
// buffer, and returns a Batch. Hostile input gets an error matching one of
// ErrMalformed, ErrTooLarge, ErrCodec, ErrSequence or ErrCorrupt, never a
// panic or an allocation beyond the limits. Package pageserver keeps what
// Decoder returns.
package pagestream
