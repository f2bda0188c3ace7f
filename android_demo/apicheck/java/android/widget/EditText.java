// Declaration only (android_demo/apicheck/README.md): the members the app shell uses, as in the Android API.
package android.widget;

import android.content.Context;
import android.text.Editable;

public class EditText extends TextView {
    public EditText(Context context) {
        super(context);
        throw new UnsupportedOperationException("declaration only");
    }

    @Override
    public Editable getText() {
        throw new UnsupportedOperationException("declaration only");
    }
}
