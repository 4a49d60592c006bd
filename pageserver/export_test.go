package pageserver

// HeldBuffers counts the received buffers not yet released (for leak
// checks in tests of other files).
var HeldBuffers = countHeld
