/* Must fail under LeakSanitizer: proves test_c_units.py would see a leak. */
#include <stdlib.h>

void *volatile kept;

int main(void)
{
    kept = malloc(64);
    kept = NULL;
    return 0;
}
