// Package image owns the on-disk format of a phaul checkpoint directory:
// how the messages of protocol/imagepb are framed in files, how page data is
// laid out, how both are written (atomically) and read back (validated), how
// a pre-dump chain of images is resolved, and how a checkpoint is rendered
// for people (`phaul show`).
//
// A checkpoint directory holds
//
//	inventory.img        imagepb.Inventory   the entry point
//	files.img            imagepb.FileTable   every open file description
//	process-PID.img      imagepb.Process     one per process
//	pagemap-PID.img      imagepb.PageMap     one per process: where its pages are
//	pages-PID.img        raw page data       one per process
//	shmem-ID.img         raw data            one per shared memory object (shmem.go)
//
// # Framed message files
//
// Every *.img file but pages-PID.img is one framed protobuf message. All
// integers are little-endian.
//
//	 offset  size
//	+-------+------+--------------------------------------------------+
//	|     0 |    8 | magic "PHAULIMG"                                 |
//	|     8 |    2 | format version (Version)                         |
//	|    10 |    2 | file kind (Kind: 1 inventory, 2 files,           |
//	|       |      |            3 process, 4 pagemap)                 |
//	|    12 |    4 | flags, reserved: 0                               |
//	|    16 |    8 | payload length N (at most MaxPayloadSize)        |
//	|    24 |    4 | CRC-32C (Castagnoli) of the payload              |
//	|    28 |    4 | CRC-32C of header bytes 0..27                    |
//	+-------+------+--------------------------------------------------+
//	|    32 |    N | payload: the protobuf encoding of the message    |
//	+-------+------+--------------------------------------------------+
//	                nothing follows the payload
//
// A reader checks, in this order: the magic (ErrBadMagic), the version
// (ErrVersion), the header checksum (ErrChecksum), the kind (ErrKind), the
// flags (ErrVersion), the length bound (ErrCorrupt), that the payload is all
// there and nothing follows it (ErrTruncated, ErrCorrupt), the payload
// checksum (ErrChecksum), the protobuf decoding and then the meaning of the
// message (ErrCorrupt). A file too short to hold the header is ErrTruncated
// unless the bytes it has already disagree with the magic.
//
// # Pages file
//
// pages-PID.img starts with one 4096-byte header block, so that page data
// stays page aligned in the file and can be mapped:
//
//	 offset  size
//	+-------+------+--------------------------------------------------+
//	|     0 |    8 | magic "PHAULPGS"                                 |
//	|     8 |    2 | format version (Version)                         |
//	|    10 |    2 | reserved: 0                                      |
//	|    12 |    4 | pid                                              |
//	|    16 |    4 | CRC-32C of bytes 0..15                           |
//	|    20 | 4076 | zero                                             |
//	+-------+------+--------------------------------------------------+
//	|  4096 |  ... | page data, in whole 4096-byte pages              |
//	+-------+------+--------------------------------------------------+
//
// The page map (pagemap-PID.img) says what the data is. Its runs are sorted
// by address and do not overlap; each covers NrPages pages from Addr and is
// one of
//
//	PAGES_HERE       the pages are at FileOffset in this pages file
//	                 (page aligned, at or after 4096, at most MaxRunPages
//	                 pages, CRC-32C of the bytes in Crc32C)
//	PAGES_ZERO       the pages were all zero: restored as holes
//	PAGES_IN_PARENT  the pages are in the parent image (Inventory.Parent,
//	                 relative to this directory or absolute)
//
// OpenChain follows PAGES_IN_PARENT runs through the chain of parents and
// gives the final place of every page, the newest image winning.
//
// # Writing
//
// Files are written to a temporary file in the same directory and renamed
// into place, so a reader sees the old file or the new one, never half of
// one. With Dir.Sync set, files are fsynced before the rename and the
// directory after it. PageWriter streams page data and writes the page map
// when it is closed.
//
// # Trust
//
// Everything read is validated: framing, checksums, and the meaning of the
// content (sorted and page-aligned runs and mappings, threads present,
// descriptors that name existing files, ...). Code that restores from a
// Checkpoint returned by Load may rely on those invariants; the invariants
// are listed on the Validate functions. No input makes this package panic or
// allocate more than MaxPayloadSize for a message.
package image
