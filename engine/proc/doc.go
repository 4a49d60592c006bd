// Package proc parses the /proc files phaul reads about a process: its
// mappings (smaps), stat and status fields, descriptors and their fdinfo,
// auxv and pagemap. Parsers take the file contents, so they are tested and
// fuzzed without a live process; thin readers fetch the files.
package proc
