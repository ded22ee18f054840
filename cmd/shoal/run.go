package main

import (
	"fmt"
	"os"
)

// STUB: replaced by its owner.
func cmdRun(args []string) int {
	fmt.Fprintln(os.Stderr, "shoal run: not implemented yet")
	return 1
}
