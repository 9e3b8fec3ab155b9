/* Must fail under AddressSanitizer: proves test_c_units.py would see a use after free. */
#include <stdlib.h>

char *volatile kept;

int main(void)
{
    kept = malloc(8);
    free(kept);
    return kept[0];
}
